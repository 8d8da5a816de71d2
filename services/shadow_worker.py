"""The shadow process's worker (:mod:`services.shadow_child` starts it): candidate copies, the job
loop, the duty cycle and the figures sent back to the service."""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import time
from collections import deque
from pathlib import Path

import structlog

from services.errors import ServiceError
from services.model import OnnxModel
from services.shadow import (
    IDLE_S,
    POLL_S,
    PairFigures,
    ShadowJob,
    ShadowPlan,
    Starvation,
    idle_after,
    run_and_compare,
)
from services.shadow_ring import DONE, JOB, FrameReader, Want, frame, read_available, read_job

log = structlog.get_logger("services.shadow")

FIGURES_EVERY_S = 0.1
"""Figures go to the service at most this often while jobs come, and once the queue empties."""

Figures = dict[tuple[str, int, int], tuple[int, int, int, int, float, float]]
"""(model, baseline, candidate) → (compared, agreed, errors, dropped, diff_sum, diff_max)."""


def mismatch(want: Want, copy: OnnxModel) -> str | None:
    """Why ``copy`` is not the model the service serves, None where it is."""
    if copy.sha256 != want.sha256:
        return (f"the file's sha256 is {copy.sha256[:12]}, the service loaded {want.sha256[:12]} "
                "(it changed on disk since)")
    if copy.fingerprint != want.fingerprint:
        return (f"the file's size and mtime {copy.fingerprint} differ from the service's {want.fingerprint} "
                "(it was rewritten since)")
    return None


class ChildWorker:
    def __init__(self, arena_fd: int, arena_bytes: int, *, jobs_fd: int, control_fd: int, figures_fd: int,
                 cpu_share: float, step_aside: bool = True) -> None:
        self._arena = mmap.mmap(arena_fd, arena_bytes)
        self._view = memoryview(self._arena)
        self._jobs_fd = jobs_fd
        self._done = 0
        self._control_fd, self._figures_fd = control_fd, figures_fd
        os.set_blocking(jobs_fd, False)
        os.set_blocking(control_fd, False)
        self.cpu_share = cpu_share
        self.step_aside = step_aside
        """Whether a starved worker steps aside (:class:`services.shadow.Starvation`): under
        ``--policy idle``."""
        self._control = FrameReader()
        self._job_bytes = bytearray()
        self._pending: deque[tuple[int, int]] = deque()
        self.wants: dict[tuple[str, int], Want] = {}
        self.copies: dict[tuple[str, int], OnnxModel | str] = {}
        """(model, candidate) → this process's copy, or why there is none (dropped: counted)."""
        self.pairs: dict[tuple[str, int, int], PairFigures] = {}
        self._dirty = False
        self._sent_at = 0.0
        self._open = True

    def log_start(self, got: str) -> None:
        log.info("shadow_worker", priority=got, isolation="process", pid=os.getpid(), cpu_share=self.cpu_share)

    # -- control ------------------------------------------------------------------------------
    def _read_control(self) -> None:
        data = read_available(self._control_fd)
        if data is None:
            self._open = False  # the service closed its end: stopping, or gone
            return
        for message in self._control.feed(data):
            kind, body = message
            if kind == "wants":
                self._follow(body)

    def _follow(self, wants: dict[tuple[str, int], Want]) -> None:
        """Free the copies no longer wanted (or of another file), load the new ones."""
        for key in list(self.copies):
            if wants.get(key) != self.wants.get(key):
                copy = self.copies.pop(key)
                if isinstance(copy, OnnxModel):
                    copy.close()
                    log.info("shadow_candidate_freed", model=key[0], candidate=key[1])
        self.wants = dict(wants)
        for key, want in wants.items():
            if key not in self.copies:
                self.copies[key] = self._load(key, want)

    def _load(self, key: tuple[str, int], want: Want) -> OnnxModel | str:
        model, version = key
        try:
            copy = OnnxModel(model, version, Path(want.path), want.config)
        except ServiceError as exc:
            reason = f"the shadow process cannot load it: {exc}"
        else:
            refused = mismatch(want, copy)
            if refused is None:
                log.info("shadow_candidate_loaded", model=model, candidate=version, sha256=copy.sha256[:12],
                         seconds=round(copy.load_seconds, 3))
                return copy
            copy.close()
            reason = refused
        log.warning("shadow_candidate_mismatch", model=model, candidate=version, reason=reason,
                    consequence="its shadow jobs are counted dropped until the service loads it again")
        return reason

    # -- jobs ---------------------------------------------------------------------------------
    def _read_jobs(self) -> None:
        data = read_available(self._jobs_fd)
        if data is None:
            self._open = False
            return
        self._job_bytes += data
        whole = len(self._job_bytes) - len(self._job_bytes) % JOB.size
        for offset, length in JOB.iter_unpack(bytes(self._job_bytes[:whole])):
            self._pending.append((offset, length))
        del self._job_bytes[:whole]

    def _one(self, offset: int, length: int) -> None:
        static, request_id, arrays = read_job(self._view, offset, length)
        model, baseline, candidate, rtol, atol, compare, names, feed_names = static
        pair = self.pairs.get((model, baseline, candidate))
        if pair is None:
            pair = self.pairs[(model, baseline, candidate)] = PairFigures()
        self._dirty = True
        copy = self.copies.get((model, candidate))
        if not isinstance(copy, OnnxModel):
            pair.dropped += 1
            return
        plan = ShadowPlan(candidate, baseline, 1.0, rtol, atol, compare)
        feeds = dict(zip(feed_names, arrays, strict=False))
        answers = tuple(arrays[len(feed_names):])
        job = ShadowJob(model, baseline, plan, request_id, feeds, names, answers, length)
        run_and_compare(job, copy, pair, contextlib.nullcontext)  # the whole process is under its policy already

    def figures(self) -> Figures:
        return {key: (p.compared, p.agreed, p.errors, p.dropped, p.diff_sum, p.diff_max)
                for key, p in self.pairs.items()}

    def _send_figures(self) -> None:
        data = memoryview(frame(("figures", self.figures())))
        while data:  # blocking writes: the service drains the pipe every tick
            data = data[os.write(self._figures_fd, data):]
        self._dirty = False
        self._sent_at = time.monotonic()

    def _idle(self, seconds: float) -> None:
        """Sleep ``seconds``, reading control messages meanwhile: the service's end of file ends
        the pause (and the worker) at once."""
        deadline = time.monotonic() + seconds
        while self._open and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._control_fd], [], [], left)
            if readable:
                self._read_control()

    def run(self) -> None:
        charged_from = time.process_time()
        idle_since: float | None = None
        starvation = Starvation(enabled=self.step_aside)
        while self._open:
            self._read_control()
            if not self._pending:
                self._read_jobs()
            if not self._pending:
                if self._dirty:
                    self._send_figures()
                now = time.monotonic()
                idle_since = now if idle_since is None else idle_since
                if now - idle_since < IDLE_S:
                    time.sleep(POLL_S)  # jobs written meanwhile wake no one: cheap for the service
                else:
                    select.select([self._control_fd, self._jobs_fd], [], [], 1.0)
                continue
            if idle_since is not None:  # waiting for jobs is not waiting for the core
                starvation.restart(time.process_time())
                idle_since = None
            offset, length = self._pending.popleft()
            started = time.monotonic()
            try:
                self._one(offset, length)
            except Exception:  # a comparison must never end the worker
                log.exception("shadow_failed", offset=offset)
            finally:  # its space is the service's again (after the comparison: the arrays are views of it)
                self._done += 1
                DONE.pack_into(self._view, 0, self._done)
            wall = time.monotonic() - started
            # The whole process's CPU since the last job: ONNX Runtime's pool threads included.
            now_cpu = time.process_time()
            cpu, charged_from = now_cpu - charged_from, now_cpu
            if self._dirty and time.monotonic() - self._sent_at >= FIGURES_EVERY_S:
                self._send_figures()
            if (starved := starvation.pause(now_cpu)) > 0:
                if self._dirty:  # a long pause would hold the figures back
                    self._send_figures()
                self._idle(starved)
                starvation.restart(time.process_time())
            elif (share := idle_after(cpu, wall, self.cpu_share)) > 0:
                idled_from = time.monotonic()
                self._idle(share)
                starvation.idled(time.monotonic() - idled_from)
        if self._dirty:
            self._send_figures()
