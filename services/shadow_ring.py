"""The hand-off between a service and its shadow process: jobs in shared memory, offsets over pipes.

One shared-memory arena (a ``memfd``: no name in ``/dev/shm``, so nothing to unlink and nothing
left behind by a killed service) holds the queued jobs; :class:`Ring` allocates them in it, in
order, bounded in jobs (``--shadow-queue``) and in bytes (``--shadow-queue-mb``, the arena's
size). A job is its metadata pickled (protocol 5) with the numeric arrays out of band, copied
straight after it (:func:`encode_job`, :func:`write_job`); the child reads them back as arrays over
the same memory (:func:`read_job`), without a copy. The offsets travel as fixed-size messages
(:data:`JOB`) over a pipe, each written whole (far below PIPE_BUF, so atomic); the child counts
the jobs it is done with in the arena's first bytes (:data:`DONE`), which the service reads
without a system call to take their space back. Control messages and figures are
length-prefixed pickles on pipes of their own (:class:`FrameReader`).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.config import ModelConfig

JOB = struct.Struct("<QQ")
"""Parent → child: (offset, length) of a job in the arena."""
DONE = struct.Struct("<Q")
"""At the arena's start: how many jobs the child is done with (it takes them in order)."""
_HEAD = struct.Struct("<II")
"""At a job's offset: (length of the pickled metadata, number of out-of-band buffers)."""
_LENGTH = struct.Struct("<Q")
_FRAME = struct.Struct("<I")
ALIGN = 64
"""Arrays start on cache-line boundaries: ONNX Runtime and numpy read them in place."""
BASE = ALIGN
"""Jobs start after the :data:`DONE` counter's cache line."""
_DTYPES: dict[np.dtype[Any], str] = {}


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class Ring:
    """Space in an arena of ``capacity`` bytes for at most ``max_jobs`` jobs at once.

    Allocation is contiguous and in order (a ring: after the end it wraps to the start once the
    oldest jobs there are freed); frees may come in any order, and the space of a freed job is
    reused once every job allocated before it is freed too. Not thread-safe: the caller holds its
    lock around :meth:`allocate` and :meth:`free`."""

    def __init__(self, capacity: int, max_jobs: int) -> None:
        self.capacity = capacity
        self.max_jobs = max_jobs
        self._live: dict[int, tuple[int, Any]] = {}
        """offset → (end, tag), in allocation order (the first is the oldest: the ring's tail)."""
        self._done: set[int] = set()
        """Offsets freed while an older job is still live."""
        self._head = 0

    def __len__(self) -> int:
        return len(self._live)

    def allocate(self, size: int, tag: Any = None) -> int | None:
        """The offset of ``size`` bytes now reserved, None where they do not fit (the job is dropped)."""
        if size <= 0 or size > self.capacity or len(self._live) >= self.max_jobs:
            return None
        if not self._live:
            start = 0  # empty: start over at the beginning, so a quiet arena touches few pages
        else:
            tail, head = next(iter(self._live)), self._head
            if head > tail:  # live jobs in [tail, head): room after head, else at the start
                if head + size <= self.capacity:
                    start = head
                elif size <= tail:
                    start = 0
                else:
                    return None
            elif head + size <= tail:  # wrapped: live in [tail, end) and [0, head)
                start = head
            else:
                return None
        self._live[start] = (start + size, tag)
        self._head = start + size
        return start

    def free(self, offset: int) -> Any:
        """Give back the job at ``offset``; returns its tag (None for an offset not live)."""
        entry = self._live.get(offset)
        if entry is None or offset in self._done:
            return None
        if offset != next(iter(self._live)):
            self._done.add(offset)
            return entry[1]
        del self._live[offset]
        while self._live:
            oldest = next(iter(self._live))
            if oldest not in self._done:
                break
            self._done.discard(oldest)
            del self._live[oldest]
        return entry[1]

    def clear(self) -> list[Any]:
        """Forget every job (the child that held them is gone); returns the tags of those not freed."""
        tags = [tag for offset, (_end, tag) in self._live.items() if offset not in self._done]
        self._live.clear()
        self._done.clear()
        self._head = 0
        return tags


def encode_job(static: bytes, request_id: str, arrays: Sequence[npt.NDArray[Any]]
               ) -> tuple[bytes, list[memoryview], int]:
    """(metadata, array buffers, bytes needed in the arena) of a job: ``static`` the pickled
    metadata its plan shares with every job of the plan (made once), ``arrays`` as raw buffers.

    On the request thread, outside any lock: the part of an offer that grows with the job besides
    the copy. Written out by hand because pickling the arrays themselves (or the plan, a
    dataclass) cost ten times as much: numeric arrays travel as (dtype, shape) and their bytes;
    BYTES (object) arrays, rare and small, as their items in the metadata."""
    specs: list[tuple[Any, ...]] = []
    raws: list[memoryview] = []
    for array in arrays:
        dtype = array.dtype
        if dtype.kind == "O":
            specs.append(("O", array.shape, list(array.flat)))
            continue
        code = _DTYPES.get(dtype)
        if code is None:
            code = _DTYPES[dtype] = dtype.str
        specs.append((code, array.shape))
        if not array.size:
            raws.append(memoryview(b""))
            continue
        # A copy only where a caller sliced it (ascontiguousarray would also make 0-d arrays 1-d).
        contiguous = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        raws.append(contiguous.data.cast("B"))
    header = static + pickle.dumps((request_id, specs), protocol=5)
    size = _aligned(_HEAD.size + _LENGTH.size * len(raws) + len(header))
    for raw in raws:
        size += _aligned(raw.nbytes)
    return header, raws, size


def write_job(arena: memoryview, offset: int, header: bytes, raws: list[memoryview]) -> None:
    """Copy an encoded job into ``arena`` at ``offset`` (the space :func:`encode_job` sized)."""
    meta = _HEAD.pack(len(header), len(raws)) + b"".join(_LENGTH.pack(raw.nbytes) for raw in raws) + header
    arena[offset:offset + len(meta)] = meta
    at = offset + _aligned(len(meta))
    for raw in raws:
        arena[at:at + raw.nbytes] = raw
        at += _aligned(raw.nbytes)


def read_job(arena: memoryview, offset: int, length: int) -> tuple[Any, str, list[npt.NDArray[Any]]]:
    """(static metadata, request id, arrays) of the job written at ``offset``: numeric arrays are
    views of the arena (valid until the job is counted done)."""
    header_len, count = _HEAD.unpack_from(arena, offset)
    at = offset + _HEAD.size
    lengths = [_LENGTH.unpack_from(arena, at + i * _LENGTH.size)[0] for i in range(count)]
    at += _LENGTH.size * count
    header = io.BytesIO(arena[at:at + header_len])
    # Written by our own parent process only: two pickles, the plan's and the job's own.
    static, (request_id, specs) = pickle.load(header), pickle.load(header)
    at = offset + _aligned(_HEAD.size + _LENGTH.size * count + header_len)
    arrays: list[npt.NDArray[Any]] = []
    buffers = iter(lengths)
    for spec in specs:
        if spec[0] == "O":
            items = np.empty(len(spec[2]), dtype=np.object_)
            items[:] = spec[2]
            arrays.append(items.reshape(spec[1]))
            continue
        n = next(buffers)
        if at + n > offset + length:
            raise ValueError(f"job at {offset}: buffer beyond its {length} bytes")
        arrays.append(np.frombuffer(arena[at:at + n], dtype=np.dtype(spec[0])).reshape(spec[1]))
        at += _aligned(n)
    return static, request_id, arrays


def frame(message: object) -> bytes:
    """A length-prefixed pickle, for :class:`FrameReader` at the other end of a pipe."""
    body = pickle.dumps(message, protocol=5)
    return _FRAME.pack(len(body)) + body


class FrameReader:
    """Frames from a pipe read in pieces (non-blocking reads may end in the middle of one)."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        self._pending += data
        while len(self._pending) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self._pending)
            if len(self._pending) < _FRAME.size + size:
                return
            body = bytes(self._pending[_FRAME.size:_FRAME.size + size])
            del self._pending[:_FRAME.size + size]
            yield pickle.loads(body)  # between the service and its own child


def read_available(fd: int, limit: int = 1 << 16) -> bytes | None:
    """What a non-blocking pipe holds now (b"" when empty), None at end of file."""
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, limit)
        except BlockingIOError:
            break
        if not data:
            return b"".join(chunks) if chunks else None
        chunks.append(data)
        if len(data) < limit:
            break
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class Want:
    """A candidate version the child is to load: the file and the options the service loaded it
    with, and what the service read (the child refuses a copy that differs)."""

    path: str
    config: ModelConfig
    sha256: str
    fingerprint: tuple[int, int]
