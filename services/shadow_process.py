"""Shadow comparison in a process of its own (``--shadow-isolation process``).

The thread worker of :class:`services.shadow.Shadow` keeps to its CPU share and runs the candidate
under SCHED_IDLE, but shares the GIL with the handler threads (taking jobs, the comparison,
counting): at 100 % shadow the callers lost 13 to 17 % of their throughput to it. Here the worker is
a child process (:mod:`services.shadow_child`) with its own interpreter, its own copy of each
candidate, and SCHED_IDLE for all of its life.

The request thread's part (:meth:`ProcessShadow._enqueue`): describe the job (its plan's
metadata pickled once, the request id, dtypes and shapes), then, under the lock, take back the
space of the jobs the child counted done (one read of the arena's counter, no system call),
allocate the job's space in the shared arena (:class:`Ring`, bounded by ``--shadow-queue`` jobs
and ``--shadow-queue-mb`` bytes), copy it there and write its 16-byte offset to the jobs pipe
without blocking. No space, a full pipe, a child not running, a
candidate the child was not told of: the job is dropped and counted.

A supervisor thread starts the child once a plan in force has its candidate served here (a
service that shadows nothing has no child), tells it which candidates to load (from the catalog and the
rollout plans, whenever either changes), drains its figures, and restarts it with backoff when it
dies (its jobs in flight counted dropped). The figures on /metrics are the service's own drops
plus the child's cumulative counts plus those of children that died before.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt
import structlog

import services
from services.catalog import ModelCatalog
from services.model import OnnxModel
from services.settings import ServiceSettings
from services.shadow import CPU_SHARE, QUEUE_BYTES, PairFigures, Policy, Shadow, ShadowPlan
from services.shadow_ring import (
    BASE,
    DONE,
    JOB,
    FrameReader,
    Ring,
    Want,
    encode_job,
    frame,
    read_available,
    write_job,
)

log = structlog.get_logger("services.shadow")

TICK_S = 0.1
"""The supervisor's period: candidates followed, figures drained, freed space taken back."""
BACKOFF_S = (0.5, 30.0)
"""A child that died is restarted after the first delay, doubled on each death up to the second;
one that lived a minute starts over at the first."""
_Figures = dict[tuple[str, int, int], tuple[int, int, int, int, float, float]]


def supported() -> bool:
    """Whether this platform has what the process isolation uses (Linux: memfd, SCHED_IDLE)."""
    return hasattr(os, "memfd_create") and sys.platform.startswith("linux")


def _add(into: dict[tuple[str, int, int], list[float]], key: tuple[str, int, int], values: Sequence[float]) -> None:
    total = into.setdefault(key, [0, 0, 0, 0, 0.0, 0.0])
    for i in range(5):
        total[i] += values[i]
    total[5] = max(total[5], values[5])


class ProcessShadow(Shadow):
    """:class:`Shadow` with the worker in a child process; the same plans, offers and metrics."""

    def __init__(self, catalog: ModelCatalog, *, queue_size: int = 64, queue_bytes: int = QUEUE_BYTES,
                 cpu_share: float = CPU_SHARE, policy: Policy = "idle", log_level: str = "info",
                 log_format: str = "auto", log_levels: str | None = None) -> None:
        super().__init__(catalog, queue_size=queue_size, queue_bytes=queue_bytes, cpu_share=cpu_share, policy=policy)
        self._log_args = ["--log-level", log_level, "--log-format", log_format,
                          *(["--log-levels", log_levels] if log_levels else [])]
        self._ring = Ring(queue_bytes, queue_size)
        self._arena_fd = -1
        self._arena: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._jobs_w = self._control_w = self._figures_r = -1
        self._issued: deque[tuple[int, int]] = deque()
        """(sequence number, ring offset) of the jobs handed over and not yet counted done."""
        self._sequence = 0
        self._statics: dict[tuple[Any, ...], bytes] = {}
        """The pickled metadata each (model, version, plan, outputs, inputs) shares (a few entries)."""
        self._control_pending = bytearray()
        self._figures_lock = threading.Lock()
        """Guards the figures pipe, its reader and the two tables below (supervisor and scrapes)."""
        self._reader = FrameReader()
        self._child_now: _Figures = {}
        self._carried: dict[tuple[str, int, int], list[float]] = {}
        """Figures of children that died: added, so the counters on /metrics never go back."""
        self._known: frozenset[tuple[str, int]] = frozenset()
        """(model, candidate) the child was told to load: only their jobs are handed over."""
        self._sent_wants: dict[tuple[str, int], Want] | None = None
        self._followed: tuple[object, object] = (None, None)
        self._needed_for: tuple[object, object] = (None, None)
        self._need = False
        self._proc: subprocess.Popen[bytes] | None = None
        self.child_pid: int | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._spawned = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._stop_timeout = 5.0

    # -- the request thread ---------------------------------------------------------------------
    def _enqueue(self, served: OnnxModel, plan: ShadowPlan, request_id: str, *, feeds: dict[str, npt.NDArray[Any]],
                 names: Sequence[str], answers: Sequence[npt.NDArray[Any]]) -> None:
        model, version = served.name, served.version
        tag = (model, version, plan.candidate)
        if (model, plan.candidate) not in self._known or not self._room():
            self._drop(tag)
            return
        try:
            key = (model, version, plan, tuple(names), tuple(feeds))
            static = self._statics.get(key)
            if static is None:
                if len(self._statics) >= 256:  # new plans and signatures over a long life: start over
                    self._statics.clear()
                static = self._statics[key] = pickle.dumps(
                    (model, version, plan.candidate, plan.rtol, plan.atol, plan.compare, key[3], key[4]), protocol=5)
            header, raws, size = encode_job(static, request_id, (*feeds.values(), *answers))
        except Exception:  # an array pickle refuses: the caller has its answer, the comparison is lost
            log.exception("shadow_encode_failed", model=model, candidate=plan.candidate)
            self._drop(tag)
            return
        with self._lock:
            if self._jobs_w < 0 or self._view is None:
                self._pair(*tag).dropped += 1
                return
            if len(self._ring):
                self._take_back()
            offset = self._ring.allocate(size, tag)
            if offset is None:  # no room in jobs or bytes (or larger than the whole arena)
                self._pair(*tag).dropped += 1
                return
            write_job(self._view, BASE + offset, header, raws)
            try:
                os.write(self._jobs_w, JOB.pack(BASE + offset, size))  # 16 bytes: whole or not at all
            except OSError:  # BlockingIOError: the pipe is full; others: the child's end is gone
                self._ring.free(offset)
                self._pair(*tag).dropped += 1
                return
            self._issued.append((self._sequence, offset))
            self._sequence += 1

    def _room(self) -> bool:
        """Whether a job could be handed over now: checked before the job is encoded, so that an
        offer the child has no room for (at 100 % shadow, most of them while it keeps to its CPU
        share) costs a counter read, not the encoding. Without the lock: a hint (the jobs handed
        over less those the child counted done), which the allocation checks again under it."""
        view = self._view
        if view is None or self._jobs_w < 0:
            return False
        try:
            (done,) = DONE.unpack_from(view, 0)
        except ValueError:  # the arena was just released (the child ended)
            return False
        return bool(self._sequence - done < self._ring.max_jobs)

    def _take_back(self) -> None:
        """Space of the jobs the child counted done (under ``_lock``; never blocks). It takes them
        in the order they were written to the pipe, which is their order in ``_issued``."""
        if self._view is None:
            return
        (done,) = DONE.unpack_from(self._view, 0)
        issued = self._issued
        while issued and issued[0][0] < done:
            self._ring.free(issued.popleft()[1])

    # -- figures --------------------------------------------------------------------------------
    def _drain_figures(self) -> None:
        with self._figures_lock:
            if self._figures_r < 0:
                return
            data = read_available(self._figures_r)
            if data:
                for kind, body in self._reader.feed(data):
                    if kind == "figures":
                        self._child_now = body

    def figures(self) -> list[tuple[tuple[str, int, int], PairFigures]]:
        self._drain_figures()
        totals: dict[tuple[str, int, int], list[float]] = {}
        with self._lock:
            for key, pair in self.pairs.items():
                _add(totals, key, (pair.compared, pair.agreed, pair.errors, pair.dropped, pair.diff_sum,
                                   pair.diff_max))
        with self._figures_lock:
            for key, carried in self._carried.items():
                _add(totals, key, carried)
            for key, now in self._child_now.items():
                _add(totals, key, now)
        merged = []
        for key, (compared, agreed, errors, dropped, diff_sum, diff_max) in sorted(totals.items()):
            pair = PairFigures()
            pair.compared, pair.agreed = int(compared), int(agreed)
            pair.errors, pair.dropped = int(errors), int(dropped)
            pair.diff_sum, pair.diff_max = diff_sum, diff_max
            merged.append((key, pair))
        return merged

    # -- the candidates -------------------------------------------------------------------------
    def wanted(self) -> dict[tuple[str, int], Want]:
        """(model, candidate) → the candidate as this service loaded it, for every plan in force
        whose candidate is served here."""
        wants: dict[tuple[str, int], Want] = {}
        plans: Mapping[str, ShadowPlan] = self.rollout_plans
        for model, versions in self.catalog.served().items():
            plan = plans.get(model)
            if plan is not None:
                candidates = {plan.candidate}
            else:
                candidates = {v.model.config.shadow.candidate for v in versions.values()
                              if v.model.config.shadow is not None}
            for candidate in candidates:
                served = versions.get(candidate)
                if served is not None:
                    m = served.model
                    wants[(model, candidate)] = Want(str(m.path), m.config, m.sha256, m.fingerprint)
        return wants

    def _needed(self) -> bool:
        """Whether any plan in force has its candidate served here (then a child is started)."""
        now = (self.catalog.served(), self.rollout_plans)
        if now[0] is not self._needed_for[0] or now[1] is not self._needed_for[1]:
            self._needed_for, self._need = now, bool(self.wanted())
        return self._need

    def _follow(self) -> None:
        """Tell the child of changed candidates (the catalog and the plans are replaced whole:
        an unchanged pair of references is nothing to do)."""
        now = (self.catalog.served(), self.rollout_plans)
        if self._sent_wants is not None and now[0] is self._followed[0] and now[1] is self._followed[1]:
            return
        self._followed = now
        wants = self.wanted()
        if wants != self._sent_wants:
            self._control_pending += frame(("wants", wants))
            self._sent_wants = wants
            log.info("shadow_candidates", candidates=sorted(f"{m}/{v}" for m, v in wants))
        self._known = frozenset(wants)
        self._flush_control()

    def _flush_control(self) -> None:
        if self._control_pending and self._control_w >= 0:
            with contextlib.suppress(BlockingIOError):
                written = os.write(self._control_w, self._control_pending)
                del self._control_pending[:written]

    # -- the child ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._supervisor is not None:
            return
        self._running = True
        self._stopping.clear()
        self._spawned.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="shadow-supervisor", daemon=True)
        self._supervisor.start()
        self._spawned.wait(10.0)

    def stop(self, timeout: float = 5.0) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        self._running = False
        self._stop_timeout = timeout
        self._stopping.set()
        supervisor.join(timeout + 1.0)
        with self._lock:
            if self._view is not None:
                self._view.release()
            if self._arena is not None:
                self._arena.close()
            if self._arena_fd >= 0:
                os.close(self._arena_fd)
            self._view, self._arena, self._arena_fd = None, None, -1

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self._arena is None:
            # A memfd: shared by inheritance only, no name under /dev/shm to unlink or leak.
            self._arena_fd = os.memfd_create("sluice-shadow", os.MFD_CLOEXEC)
            os.ftruncate(self._arena_fd, BASE + self._ring.capacity)
            self._arena = mmap.mmap(self._arena_fd, BASE + self._ring.capacity)
            self._view = memoryview(self._arena)
        with self._lock:  # a new child counts from 0
            if self._view is not None:
                DONE.pack_into(self._view, 0, 0)
            self._sequence = 0
            self._issued.clear()
        jobs_r, jobs_w = os.pipe()
        control_r, control_w = os.pipe()
        figures_r, figures_w = os.pipe()
        for fd in (jobs_w, control_w, figures_r):
            os.set_blocking(fd, False)
        ours = (jobs_r, control_r, figures_w)
        root = str(Path(services.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.shadow_child", "--parent", str(os.getpid()),
                 "--arena-fd", str(self._arena_fd), "--arena-bytes", str(BASE + self._ring.capacity),
                 "--jobs-fd", str(jobs_r), "--control-fd", str(control_r),
                 "--figures-fd", str(figures_w), "--policy", self.policy, "--cpu-share", str(self.cpu_share),
                 *self._log_args],
                pass_fds=(self._arena_fd, *ours), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            for fd in (*ours, jobs_w, control_w, figures_r):
                os.close(fd)
            raise
        for fd in ours:
            os.close(fd)
        with self._lock:
            self._jobs_w = jobs_w
        with self._figures_lock:
            self._figures_r, self._reader = figures_r, FrameReader()
        self._control_w = control_w
        self._control_pending.clear()
        self._sent_wants = None
        self._follow()  # before any job: the child reads its control pipe first
        self.child_pid = proc.pid
        log.info("shadow_process_started", pid=proc.pid, restarts=self.restarts, policy=self.policy,
                 cpu_share=self.cpu_share, arena_bytes=self._ring.capacity)
        return proc

    def _supervise(self) -> None:
        delay = BACKOFF_S[0]
        while not self._stopping.is_set():
            if not self._needed():  # nothing to shadow here: no child, no second interpreter in memory
                self._spawned.set()
                self._stopping.wait(TICK_S)
                continue
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as exc:
                log.error("shadow_process_start_failed", error=str(exc), retry_in_s=delay)
                self._spawned.set()
                self._stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_S[1])
                continue
            self._proc = proc
            self._spawned.set()
            code = proc.poll()
            while code is None and not self._stopping.wait(TICK_S):
                self._tick()
                code = proc.poll()
            if self._stopping.is_set():
                self._end(proc)
                return
            lost = self._forget_child()
            delay = BACKOFF_S[0] if time.monotonic() - started > 60 else delay
            self.restarts += 1
            log.error("shadow_process_died", pid=proc.pid, exit_code=code, in_flight_dropped=lost,
                      restart_in_s=delay, consequence="the service goes on; shadow jobs are dropped until it is back")
            self._stopping.wait(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    def _tick(self) -> None:
        # The supervisor must outlive anything a tick meets: the child dies with its thread.
        try:
            self._follow()
            self._flush_control()
            self._drain_figures()
            with self._lock:
                if len(self._ring):
                    self._take_back()
        except Exception:
            log.exception("shadow_supervisor_tick_failed")

    def _forget_child(self) -> int:
        """After the child ended: its last figures kept, its jobs in flight counted dropped, its
        pipes closed. Returns how many jobs were lost."""
        with self._figures_lock:
            if self._figures_r >= 0:
                while (data := read_available(self._figures_r)):  # what it sent before it ended
                    for kind, body in self._reader.feed(data):
                        if kind == "figures":
                            self._child_now = body
                os.close(self._figures_r)
                self._figures_r = -1
            for key, values in self._child_now.items():
                _add(self._carried, key, values)
            self._child_now = {}
        with self._lock:
            self._take_back()  # what it finished before it ended was compared, not lost
            lost = self._ring.clear()
            self._issued.clear()
            for tag in lost:
                self._pair(*tag).dropped += 1
            if self._jobs_w >= 0:
                os.close(self._jobs_w)
            self._jobs_w = -1
        if self._control_w >= 0:
            os.close(self._control_w)
            self._control_w = -1
        self._known = frozenset()
        self._proc, self.child_pid = None, None
        return len(lost)

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop the child within the stop timeout: end of file first (it finishes the job it
        runs and sends its figures), SIGKILL at the end of the time."""
        with self._lock:
            if self._jobs_w >= 0:
                os.close(self._jobs_w)
                self._jobs_w = -1
        if self._control_w >= 0:
            os.close(self._control_w)
            self._control_w = -1
        deadline = time.monotonic() + self._stop_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            self._drain_figures()  # the child may block writing its last figures
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget_child()


def make_shadow(settings: ServiceSettings, catalog: ModelCatalog) -> Shadow:
    """The service's shadow worker, in a thread or a process as ``--shadow-isolation`` says (a
    thread where the platform lacks what the process needs, said in the log)."""
    common: dict[str, Any] = {"queue_size": settings.shadow_queue,
                              "queue_bytes": settings.shadow_queue_mb * 1024 * 1024,
                              "cpu_share": settings.shadow_cpu_share, "policy": settings.shadow_policy}
    if settings.shadow_isolation == "process":
        if supported():
            return ProcessShadow(catalog, log_level=settings.log_level, log_format=settings.log_format,
                                 log_levels=settings.log_levels, **common)
        log.warning("shadow_isolation_unsupported", wanted="process", platform=sys.platform,
                    consequence="the shadow worker runs as a thread of the service")
    return Shadow(catalog, **common)
