"""What a running process is doing: an in-process sampling CPU profiler and a stack of every thread.

The sampler is a thread that reads :func:`sys._current_frames` at a fixed rate and counts each
thread's stack. It needs no rights beyond the process's own (py-spy reads another process's memory
and needs ``SYS_PTRACE`` in a container), and it sees every thread: a gRPC handler thread inside
ONNX Runtime's ``run()`` (which releases the GIL) shows as the Python frame that called
``session.run``. It samples wall-clock time: a thread waiting counts as much as one computing,
unless ``idle=False`` leaves out samples whose innermost frame is a known wait.

Output: collapsed stacks (``thread;outer;...;inner count``, what flamegraph.pl and speedscope read)
or speedscope's JSON file format, one profile per thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

MAX_SECONDS = 60.0
"""Longest profile one request may ask for."""
MAX_HZ = 250
DEFAULT_HZ = 100
MAX_DEPTH = 128
"""Frames kept per stack (the outermost ones; a deeper stack is marked ``[truncated]``)."""
MAX_STACKS = 10_000
"""Distinct stacks kept per profile; samples of further stacks count as ``[dropped]``."""

_IDLE_LEAVES = frozenset({
    ("threading.py", "wait"), ("threading.py", "_wait_for_tstate_lock"), ("selectors.py", "select"),
    ("queue.py", "get"), ("thread.py", "_worker"), ("socket.py", "accept"), ("socketserver.py", "serve_forever"),
    ("handlers.py", "_work"),  # the model service's handler pool, waiting in SimpleQueue.get (C)
})
"""(file name, function) of innermost frames that mean "waiting": left out when ``idle=False``."""

_Key = tuple[tuple[CodeType, int], ...]


def _prefixes() -> list[str]:
    # Longest first: a file under site-packages is named from there, not from the venv root.
    paths = {os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)}
    return sorted((p.rstrip(os.sep) + os.sep for p in paths), key=len, reverse=True)


class _Names:
    """Short file names (relative to the import path they came from), cached per file."""

    def __init__(self) -> None:
        self._prefixes = _prefixes()
        self._files: dict[str, str] = {}

    def file(self, filename: str) -> str:
        short = self._files.get(filename)
        if short is None:
            short = filename
            for prefix in self._prefixes:
                if filename.startswith(prefix):
                    short = filename[len(prefix):]
                    break
            self._files[filename] = short
        return short


def short_file(filename: str) -> str:
    """``filename`` relative to the import path entry it lies under (as profiles and dumps name it)."""
    return _Names().file(filename)


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int

    def label(self) -> str:
        # Collapsed stacks separate frames with ';' and the count with the last ' '.
        return f"{self.function} ({self.file}:{self.line})".replace(";", ":")


@dataclass
class Profile:
    """Samples per (thread name, stack); stacks are outermost frame first."""

    hz: int
    seconds: float = 0.0
    ticks: int = 0
    """Times the sampler looked at every thread."""
    samples: dict[tuple[str, tuple[Frame, ...]], int] = field(default_factory=dict)
    dropped: int = 0
    idle_skipped: int = 0

    def collapsed(self) -> str:
        lines = [";".join([thread.replace(";", ":").replace(" ", "_"), *(f.label() for f in stack)]) + f" {count}"
                 for (thread, stack), count in sorted(self.samples.items(), key=lambda item: -item[1])]
        if self.dropped:
            lines.append(f"[dropped] {self.dropped}")
        return "\n".join(lines) + ("\n" if lines else "")

    def speedscope(self, name: str) -> dict[str, Any]:
        """The speedscope file format (https://www.speedscope.app/file-format-schema.json)."""
        frames: list[dict[str, Any]] = []
        index: dict[Frame, int] = {}
        by_thread: dict[str, tuple[list[list[int]], list[float]]] = {}
        interval = 1.0 / self.hz
        for (thread, stack), count in sorted(self.samples.items(), key=lambda item: item[0][0]):
            ids = []
            for frame in stack:
                at = index.get(frame)
                if at is None:
                    at = index[frame] = len(frames)
                    frames.append({"name": frame.function, "file": frame.file, "line": frame.line})
                ids.append(at)
            stacks, weights = by_thread.setdefault(thread, ([], []))
            stacks.append(ids)
            weights.append(round(count * interval, 6))
        profiles = [{"type": "sampled", "name": thread, "unit": "seconds", "startValue": 0,
                     "endValue": round(sum(weights), 6), "samples": stacks, "weights": weights}
                    for thread, (stacks, weights) in by_thread.items()]
        return {"$schema": "https://www.speedscope.app/file-format-schema.json", "exporter": "sluice",
                "name": name, "activeProfileIndex": 0, "shared": {"frames": frames}, "profiles": profiles}


def _stack_key(frame: FrameType | None) -> tuple[_Key, bool]:
    stack: list[tuple[CodeType, int]] = []
    while frame is not None:
        stack.append((frame.f_code, frame.f_lineno or 0))
        frame = frame.f_back
    stack.reverse()
    return tuple(stack[:MAX_DEPTH]), len(stack) > MAX_DEPTH


def _idle(key: _Key) -> bool:
    if not key:
        return True
    code = key[-1][0]
    return (os.path.basename(code.co_filename), code.co_name) in _IDLE_LEAVES


def sample(seconds: float, hz: int = DEFAULT_HZ, *, idle: bool = True,
           stop: threading.Event | None = None) -> Profile:
    """Sample every thread but the calling one for ``seconds`` (until ``stop`` is set), ``hz`` times a second.

    Runs on the calling thread (an HTTP handler thread of the admin server): the sampler is the
    caller, so there is nothing to start or stop.
    """
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds:g}")
    if not 1 <= hz <= MAX_HZ:
        raise ValueError(f"hz must be 1-{MAX_HZ}, got {hz}")
    me = threading.get_ident()
    names = _Names()
    raw: dict[tuple[int, _Key, bool], int] = {}
    thread_names: dict[int, str] = {}
    profile = Profile(hz=hz)
    interval = 1.0 / hz
    started = time.monotonic()
    deadline = started + seconds
    next_tick = started
    while True:
        now = time.monotonic()
        if now >= deadline or (stop is not None and stop.is_set()):
            break
        frames = sys._current_frames()
        for ident, frame in frames.items():
            if ident == me:
                continue
            key, truncated = _stack_key(frame)
            if not idle and _idle(key):
                profile.idle_skipped += 1
                continue
            slot = (ident, key, truncated)
            if slot in raw:
                raw[slot] += 1
            elif len(raw) < MAX_STACKS:
                raw[slot] = 1
            else:
                profile.dropped += 1
        del frames
        profile.ticks += 1
        if profile.ticks % hz == 1:  # threads come and go; their names are read about once a second
            thread_names.update((t.ident, t.name) for t in threading.enumerate() if t.ident is not None)
        next_tick += interval
        pause = next_tick - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_tick = time.monotonic()  # fell behind: no burst to catch up
    profile.seconds = time.monotonic() - started
    thread_names.update((t.ident, t.name) for t in threading.enumerate() if t.ident is not None)
    for (ident, key, truncated), count in raw.items():
        stack = tuple(Frame(code.co_name, names.file(code.co_filename), line) for code, line in key)
        if truncated:
            stack += (Frame("[truncated]", "", 0),)
        slot_name = thread_names.get(ident, f"thread-{ident}")
        merged = (slot_name, stack)
        profile.samples[merged] = profile.samples.get(merged, 0) + count
    return profile


@dataclass(frozen=True)
class ThreadStack:
    name: str
    ident: int
    native_id: int | None
    daemon: bool
    frames: tuple[Frame, ...]
    """Outermost first."""
    truncated: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ident": self.ident, "native_id": self.native_id, "daemon": self.daemon,
                "truncated": self.truncated,
                "frames": [{"function": f.function, "file": f.file, "line": f.line} for f in self.frames]}


def thread_stacks(max_depth: int = MAX_DEPTH) -> list[ThreadStack]:
    """The stack of every thread now (the calling one included), sorted by thread name."""
    names = _Names()
    by_ident = {t.ident: t for t in threading.enumerate()}
    stacks: list[ThreadStack] = []
    for ident, top in sys._current_frames().items():
        summary = traceback.extract_stack(top)
        truncated = len(summary) > max_depth
        kept = summary[-max_depth:]  # a dump is read from the innermost frame: keep those
        thread = by_ident.get(ident)
        stacks.append(ThreadStack(
            name=thread.name if thread is not None else f"thread-{ident}", ident=ident,
            native_id=thread.native_id if thread is not None else None,
            daemon=thread.daemon if thread is not None else False,
            frames=tuple(Frame(s.name, names.file(s.filename), s.lineno or 0) for s in kept), truncated=truncated))
    return sorted(stacks, key=lambda s: (s.name, s.ident))


def format_thread_stacks(stacks: list[dict[str, Any]]) -> str:
    """The text form of :func:`thread_stacks` (as dicts, from JSON), innermost frame last as in a traceback."""
    out: list[str] = []
    for stack in stacks:
        daemon = " daemon" if stack.get("daemon") else ""
        out.append(f"Thread {stack.get('name')!s} (ident {stack.get('ident')}, native {stack.get('native_id')}"
                   f"{daemon}):")
        if stack.get("truncated"):
            out.append("  ... outer frames left out")
        for frame in stack.get("frames", []):
            out.append(f"  {frame.get('file')}:{frame.get('line')} in {frame.get('function')}")
        out.append("")
    return "\n".join(out)
