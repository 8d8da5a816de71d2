"""Shadow comparison: some requests the baseline answered are run again on the candidate version,
after the caller has its answer, and the outputs compared.

Never on the caller's time or at its expense: :meth:`Shadow.offer` (on the request thread, after
the answer is built) only draws a random number and puts a reference into a queue bounded in jobs
and in bytes held — a full queue drops the job. One worker thread runs the candidate through ONNX
Runtime directly (not its batcher, so the candidate's own request figures stay those of real
callers) at nice 19, under Linux's SCHED_IDLE policy only while ONNX Runtime computes
(:func:`lower_priority`, :class:`WorkerPriority`), and idles after each job so that
its CPU time stays within ``cpu_share`` of one core (:func:`idle_after`).

What to compare comes from the model's rollout document (:mod:`mesh.rollout.document`, followed
in etcd by :func:`follow_rollouts`) or, without one, from the ``shadow`` block of the model's
``config.yaml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.errors import InvalidDocumentError, MeshError
from mesh.registry.etcd.client import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.settings import EtcdSettings
from mesh.rollout.document import RolloutDocument, parse_rollout_document
from services.catalog import ModelCatalog
from services.config import ShadowConfig
from services.errors import ServiceError
from services.model import OnnxModel

log = structlog.get_logger(__name__)

QUEUE_BYTES = 256 * 1024 * 1024
"""Default bound on the bytes queued for the shadow worker (``--shadow-queue-mb``): with 64 MiB
requests, 64 queued jobs could otherwise hold 8 GiB of inputs and outputs."""
CPU_SHARE = 0.05
"""The worker's default share of one core (``--shadow-cpu-share``; docs/benchmarks.md for why)."""
SAMPLE_IDS = 10
"""Disagreeing request ids kept (and logged) per (model, baseline, candidate)."""
POLL_S = 0.005
IDLE_S = 0.1
"""With the queue empty the worker looks again every POLL_S seconds, and only after IDLE_S of
that sleeps until an offer wakes it: while jobs keep coming, an offer wakes no thread."""
_FLOAT_KINDS = "fc"

Policy = Literal["idle", "nice"]
"""How the worker thread gives way to the callers: ``idle`` (SCHED_IDLE, nice 19 where refused) or
``nice`` (nice 19 under the default policy)."""


def can_leave_idle() -> bool:
    """Whether a thread of this process may go back from SCHED_IDLE to the default policy, tried
    on a throwaway thread (one refused stays under SCHED_IDLE: it must not be the worker). Linux
    allows it an unprivileged thread only where its nice value is within RLIMIT_NICE (nice 19
    needs a soft limit of at least 1; the usual default is 0) or with CAP_SYS_NICE."""
    setter, idle = getattr(os, "sched_setscheduler", None), getattr(os, "SCHED_IDLE", None)
    if setter is None or idle is None:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            setter(0, idle, os.sched_param(0))
            setter(0, os.SCHED_OTHER, os.sched_param(0))
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="shadow-probe", daemon=True)
    thread.start()
    thread.join(5.0)
    return result == [True]


def lower_priority(policy: Policy) -> str:
    """Lower the calling thread's scheduling priority to nice 19 under the default policy (Linux
    applies it to one thread only); threads it creates later inherit it. Returns what the worker
    may use: ``"idle"`` (nice 19, and SCHED_IDLE around each candidate run: :func:`idle_during`),
    ``"nice"`` (nice 19 only) or ``"normal"`` (a platform with neither).

    ``idle``: SCHED_IDLE, because nice 19 alone does not keep the worker off the callers' time.
    The handler threads run under SCHED_BATCH (``--handler-policy batch``), and a waking SCHED_BATCH
    thread never preempts a running SCHED_OTHER one, however niced: a handler given a new call
    waited for the worker's ONNX Runtime call or its time slice to end. A SCHED_IDLE thread is
    preempted by any waking thread of another policy, SCHED_BATCH included, and gets a core only
    when no one else wants it. But only around the candidate's ONNX Runtime call, which releases
    the GIL: a SCHED_IDLE thread preempted in Python code (taking a job, the comparison) holds the
    GIL every handler thread needs, and runs again only once a core is idle, so on a saturated
    node every Python thread of the service (handlers, event loop, etcd lease keep-alive) would
    stall behind it. Where this process may not leave SCHED_IDLE again (:func:`can_leave_idle`)
    the worker stays at nice 19. ``nice``: the worker keeps a small share (about 1.5 % of a core
    against one busy thread) even on a saturated service, so a rollout's shadow step can still
    reach its comparisons there, at the cost of the delays above.

    The priority is the calling thread's only: a candidate with ``intra_op_threads`` other than
    1 computes on its session's intra-op pool as well, threads made by the thread that loaded it,
    at normal priority (:func:`charged_cpu` charges their CPU to the worker's share; it does not
    lower their priority)."""
    got = "normal"
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        got = "nice"
    if policy == "idle" and got == "nice":
        if can_leave_idle():
            got = "idle"
        else:
            log.warning("shadow_sched_idle_refused", error="this process may not leave SCHED_IDLE again",
                        consequence="the worker runs at nice 19")
    return got


class WorkerPriority:
    """The worker thread's priority: nice 19 throughout (:func:`lower_priority`), SCHED_IDLE only
    inside :meth:`idle` blocks, which the worker keeps to the GIL-free candidate run."""

    def __init__(self, policy: Policy) -> None:
        self.policy: Policy = policy
        self.got = ""
        """What :func:`lower_priority` got (set by :meth:`lower`); ``"stuck-idle"`` once going
        back from SCHED_IDLE failed, ``"nice"`` once going in did."""

    def lower(self) -> str:
        """On the thread concerned."""
        self.got = lower_priority(self.policy)
        return self.got

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """The block under SCHED_IDLE where :meth:`lower` got ``"idle"``, back to the default
        policy at nice 19 right after (Linux keeps the nice value across both changes). Where
        going in fails SCHED_IDLE is not tried again; where going back fails (the probe said it
        would not) the thread can do no better than stay, logged once and not tried again."""
        if self.got != "idle":
            yield
            return
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            self.got = "nice"
            log.warning("shadow_sched_idle_refused", error=str(exc), consequence="the worker runs at nice 19")
            yield
            return
        try:
            yield
        finally:
            try:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            except OSError as exc:
                self.got = "stuck-idle"
                log.error("shadow_sched_idle_stuck", error=str(exc),
                          consequence="the worker stays under SCHED_IDLE, holding the GIL there")


def charged_cpu(thread_cpu: float, wall: float, intra_op_threads: int) -> float:
    """The CPU a job is charged: the worker thread's own CPU time when the candidate computes on
    the calling thread only (``intra_op_threads`` 1, the default); otherwise its intra-op pool
    computed too, on threads whose CPU this thread's clock misses, and every pool thread counts
    as busy for the whole job (0: ONNX Runtime's default, one per core)."""
    if intra_op_threads == 1:
        return thread_cpu
    return max(thread_cpu, wall * (intra_op_threads or os.cpu_count() or 1))


def idle_after(cpu: float, wall: float, share: float) -> float:
    """Seconds to idle after a job that used ``cpu`` seconds of CPU in ``wall`` seconds, so that
    the job's CPU is at most ``share`` of the wall time from its start to the end of the idling.

    CPU time, not wall time: a worker preempted by the callers (it is meant to be) spends wall
    time without CPU, and a wall-time duty cycle then idled for CPU it never used."""
    if share >= 1.0:
        return 0.0
    return max(0.0, cpu / share - wall)


STARVED_WINDOW_S = 2.0
STARVED_RATIO = 50.0
STARVED_PAUSE_S = 10.0
"""A worker that had jobs for STARVED_WINDOW_S and got less than 1/STARVED_RATIO of that in CPU
time waited for a core the callers keep busy: it steps aside for STARVED_PAUSE_S (so that it is
runnable about one sixth of the time on such a core), then looks again."""


class Starvation:
    """When the worker should step aside for a saturated core (:data:`STARVED_WINDOW_S`).

    A SCHED_IDLE task that stays runnable on a core its service saturates gets almost none of it
    (0.03 to 0.1 % measured) yet costs the service 3 to 11 % of its throughput there
    (docs/benchmarks.md, "On a core of its own": a plain SCHED_IDLE loop costs the same, so it is
    the kernel's doing, not the comparisons'). There a comparison waits about a second anyway;
    sleeping between them keeps the worker off the run queue, and the jobs offered meanwhile are
    dropped (counted). The window covers the time the worker was runnable only: :meth:`restart`
    after stepping aside and when jobs come again after none, :meth:`idled` for the share's own
    idling between jobs (which must not restart it: a starved worker's jobs run as soon as it has
    the core, so the share idles after each of them, and a window restarted there never grew to
    :data:`STARVED_WINDOW_S`)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        """False under ``--shadow-policy nice``: chosen so that comparisons progress on a saturated
        core, and at nice 19 a worker gets about 1.5 % of a contended core, which would read as
        starved."""
        self._since: float | None = None
        self._cpu_at = 0.0
        self.pauses = 0
        """Pauses taken so far."""

    def restart(self, cpu_now: float) -> None:
        """A new window from now (``cpu_now``: the worker's CPU clock)."""
        self._since, self._cpu_at = time.monotonic(), cpu_now

    def idled(self, seconds: float) -> None:
        """The worker idled ``seconds`` on purpose (the share): not runnable, so not in the window."""
        if self._since is not None:
            self._since += seconds

    def pause(self, cpu_now: float) -> float:
        """Seconds to step aside after a job (0: none), from the CPU clock ``cpu_now``."""
        if not self.enabled:
            return 0.0
        if self._since is None:
            self.restart(cpu_now)
            return 0.0
        wall = time.monotonic() - self._since
        if wall < STARVED_WINDOW_S:
            return 0.0
        cpu = cpu_now - self._cpu_at
        self.restart(cpu_now)
        if cpu * STARVED_RATIO >= wall:
            return 0.0
        pause = STARVED_PAUSE_S
        self.pauses += 1
        if self.pauses == 1 or self.pauses % 60 == 0:  # a line about every ten minutes at most
            log.info("shadow_stepping_aside", seconds=round(pause, 1), window_s=round(wall, 2),
                     cpu_ms=round(1000 * cpu, 2), pauses=self.pauses,
                     reason="the core is saturated: comparisons wait for it, the offers meanwhile are dropped")
        return pause


@dataclass(frozen=True, slots=True)
class ShadowPlan:
    """Shadow ``candidate`` on requests answered by ``baseline`` (None: by any other version)."""

    candidate: int
    baseline: int | None = None
    fraction: float = 1.0
    rtol: float = 1e-5
    atol: float = 1e-6
    compare: str = "auto"

    @classmethod
    def from_rollout(cls, doc: RolloutDocument) -> ShadowPlan:
        s = doc.shadow
        return cls(doc.candidate, doc.baseline, s.fraction, s.rtol, s.atol, s.compare)


@dataclass(slots=True)
class ShadowJob:
    model: str
    baseline: int
    plan: ShadowPlan
    request_id: str
    feeds: dict[str, npt.NDArray[Any]]
    names: tuple[str, ...]
    answers: tuple[npt.NDArray[Any], ...]
    size: int
    """Bytes held (:func:`job_bytes`), counted in :attr:`Shadow.queued_bytes` while queued."""


def job_bytes(*groups: Iterable[npt.NDArray[Any]]) -> int:
    """The bytes a job's arrays hold: their buffers, plus the payloads of BYTES (object) arrays."""
    total = 0
    for arrays in groups:
        for array in arrays:
            total += array.nbytes
            if array.dtype.kind == "O":
                total += sum(len(x) for x in array.flat if isinstance(x, (bytes, str)))
    return total


class PairFigures:
    """Counters of one (model, baseline, candidate), written by the worker thread only."""

    __slots__ = ("agreed", "compared", "diff_max", "diff_sum", "disagreeing", "dropped", "errors")

    def __init__(self) -> None:
        self.compared = 0
        self.agreed = 0
        self.errors = 0
        self.dropped = 0
        self.diff_sum = 0.0
        self.diff_max = 0.0
        self.disagreeing: deque[str] = deque(maxlen=SAMPLE_IDS)


def compare_outputs(baseline: npt.NDArray[Any], candidate: npt.NDArray[Any], plan: ShadowPlan
                    ) -> tuple[bool, float]:
    """(agreed, mean absolute difference) of one output; BYTES, integers and booleans exactly.

    The worker holds the GIL here for the whole comparison of a small output (numpy releases it
    only inside loops over large arrays), and the callers' handler threads need the same GIL, so
    this is written for few numpy calls: ``np.allclose`` alone took longer than the candidate's
    ONNX Runtime run of the benchmark model. Where every value is finite (the mean difference is),
    allclose is ``|b - c| <= atol + rtol * |c|`` on the float64 copies already made for the
    difference; NaN and infinities take ``np.allclose`` itself."""
    if baseline.shape != candidate.shape:
        return False, float("inf")
    numeric = baseline.dtype.kind in "biufc" and candidate.dtype.kind in "biufc"
    how = plan.compare
    if how == "auto":
        how = "allclose" if baseline.dtype.kind in _FLOAT_KINDS else "exact"
    diff = 0.0
    if numeric and baseline.size:
        real = "c" not in (baseline.dtype.kind, candidate.dtype.kind)
        ours, theirs = baseline.astype(np.float64), candidate.astype(np.float64)  # copies: changed in place
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN: a difference, not a warning
            absdiff = np.abs(np.subtract(ours, theirs, out=ours), out=ours)
        diff = float(absdiff.sum()) / absdiff.size
        if how == "allclose" and real and math.isfinite(diff):
            bound = np.abs(theirs, out=theirs)
            bound *= plan.rtol
            bound += plan.atol
            return bool(np.less_equal(absdiff, bound).all()), diff
    if how == "exact" or not numeric:
        return bool(np.array_equal(baseline, candidate)), diff
    if how == "argmax":
        if baseline.ndim == 0 or not baseline.size:
            return bool(np.array_equal(baseline, candidate)), diff
        return bool(np.array_equal(np.argmax(baseline, axis=-1), np.argmax(candidate, axis=-1))), diff
    return bool(np.allclose(baseline, candidate, rtol=plan.rtol, atol=plan.atol, equal_nan=True)), diff


def run_and_compare(job: ShadowJob, candidate: OnnxModel, pair: PairFigures,
                    idle: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
    """Run ``job`` on ``candidate`` and count the comparison in ``pair`` (in the worker thread, or
    in the shadow process: :mod:`services.shadow_child`). ``idle`` wraps the ONNX Runtime call
    alone, the one part that releases the GIL."""
    plan = job.plan
    try:
        with idle():
            outputs = candidate.run(job.feeds, job.names)
    except ServiceError as exc:
        pair.errors += 1
        _remember(pair, job, "candidate_error", error=str(exc)[:300])
        return
    agreed, diffs = True, []
    for name, answer, got in zip(job.names, job.answers, outputs, strict=True):
        ok, diff = compare_outputs(answer, got, plan)
        agreed = agreed and ok
        diffs.append(diff)
        if not ok:
            log.debug("shadow_output_differs", model=job.model, output=name, mean_abs_diff=diff)
    diff = max(diffs, default=0.0)
    pair.compared += 1
    if np.isfinite(diff):
        pair.diff_sum += diff
        pair.diff_max = max(pair.diff_max, diff)
    if agreed:
        pair.agreed += 1
    else:
        _remember(pair, job, "disagreed", mean_abs_diff=diff)


def _remember(pair: PairFigures, job: ShadowJob, what: str, **fields: Any) -> None:
    """A bounded sample: the first SAMPLE_IDS cases one by one, then one line per 100 more."""
    pair.disagreeing.append(job.request_id)
    count = pair.errors + pair.compared - pair.agreed
    if count <= SAMPLE_IDS or count % 100 == 0:
        log.warning("shadow_" + what, model=job.model, baseline=job.baseline, candidate=job.plan.candidate,
                    request_id=job.request_id, recent_request_ids=list(pair.disagreeing), count=count,
                    **fields)


class Shadow:
    def __init__(self, catalog: ModelCatalog, *, queue_size: int = 64, queue_bytes: int = QUEUE_BYTES,
                 cpu_share: float = CPU_SHARE, policy: Policy = "idle") -> None:
        self.catalog = catalog
        self.cpu_share = cpu_share
        self.policy: Policy = policy
        self.priority = WorkerPriority(policy)
        """The worker thread's (:attr:`WorkerPriority.got` set once it runs)."""
        self.queue_bytes = queue_bytes
        """Bytes of inputs and outputs the queued jobs may hold together; a job beyond is dropped."""
        self.queued_bytes = 0
        self.queue_size = queue_size
        self._jobs: deque[ShadowJob] = deque()
        self._lock = threading.Lock()
        """Guards ``_jobs`` and ``queued_bytes`` together, so both bounds hold exactly."""
        self._waiting = False
        """The worker sleeps on ``_wake`` (set only then: most offers wake nothing)."""
        self._wake = threading.Event()
        self._stopped = threading.Event()
        """Set by :meth:`stop`: ends the worker's idling at once."""
        self.rollout_plans: dict[str, ShadowPlan] = {}
        """Model → plan from its rollout document (replaced whole by :func:`follow_rollouts`)."""
        self._config_plans: dict[str, tuple[ShadowConfig, ShadowPlan]] = {}
        """Model → its ``config.yaml`` shadow block and the plan made from it (made once, not per request)."""
        self.pairs: dict[tuple[str, int, int], PairFigures] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self._random = random.Random()

    # -- the request thread ---------------------------------------------------------------------
    def offer(self, served: OnnxModel, request_id: str, *, feeds: dict[str, npt.NDArray[Any]],
              names: Sequence[str], answers: Sequence[npt.NDArray[Any]]) -> None:
        """Called after ``served`` answered; cheap, never blocks, never raises into the request."""
        plan = self.plan_for(served)
        if plan is not None:
            self._enqueue(served, plan, request_id, feeds=feeds, names=names, answers=answers)

    def plan_for(self, served: OnnxModel) -> ShadowPlan | None:
        """The plan that shadows this answer of ``served``, None where none does (or this one is
        not drawn): the rollout document's, else the ``config.yaml`` block of the answering version."""
        model, version = served.name, served.version
        plan = self.rollout_plans.get(model)
        if plan is None:
            config = served.config.shadow
            if config is None:
                return None
            plan = self._config_plan(model, config)
        if not self._running or version == plan.candidate:
            return None
        if plan.baseline is not None and version != plan.baseline:
            return None
        if plan.fraction < 1.0 and self._random.random() >= plan.fraction:
            return None
        return plan

    def _enqueue(self, served: OnnxModel, plan: ShadowPlan, request_id: str, *, feeds: dict[str, npt.NDArray[Any]],
                 names: Sequence[str], answers: Sequence[npt.NDArray[Any]]) -> None:
        """Hand one drawn job to the worker (here: the thread's queue) or count it dropped."""
        model, version = served.name, served.version
        if len(self._jobs) >= self.queue_size:  # full (most offers at 100 %): dropped before sizing the job
            self._drop((model, version, plan.candidate))
            return
        size = job_bytes(feeds.values(), answers)
        with self._lock:
            if len(self._jobs) >= self.queue_size or self.queued_bytes + size > self.queue_bytes:
                self._pair(model, version, plan.candidate).dropped += 1
                return
            self.queued_bytes += size
            self._jobs.append(ShadowJob(model, version, plan, request_id, feeds, tuple(names), tuple(answers), size))
        if self._waiting:
            self._wake.set()

    def _drop(self, tag: tuple[str, int, int]) -> None:
        """Count one job of (model, baseline, candidate) dropped."""
        with self._lock:
            self._pair(*tag).dropped += 1

    def _config_plan(self, model: str, config: ShadowConfig) -> ShadowPlan:
        cached = self._config_plans.get(model)
        if cached is not None and cached[0] is config:
            return cached[1]
        plan = ShadowPlan(config.candidate, config.baseline, config.fraction, config.rtol, config.atol,
                          config.compare)
        self._config_plans[model] = (config, plan)
        return plan

    def _take(self) -> ShadowJob | None:
        with self._lock:
            if not self._jobs:
                return None
            job = self._jobs.popleft()
            self.queued_bytes -= job.size
            return job

    # -- the worker -----------------------------------------------------------------------------
    def _pair(self, model: str, baseline: int, candidate: int) -> PairFigures:
        key = (model, baseline, candidate)
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = PairFigures()
        return pair

    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._stopped.clear()
            self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._running = False
        self._stopped.set()
        with self._lock:  # queued comparisons are not worth a slow shutdown
            self._jobs.clear()
            self.queued_bytes = 0
        self._wake.set()
        thread.join(timeout)

    def _work(self) -> None:
        got = self.priority.lower()
        log.info("shadow_worker", priority=got, tid=threading.get_native_id(),
                  cpu_share=self.cpu_share)
        charged_from = time.thread_time()
        idle_since: float | None = None
        starvation = Starvation(enabled=self.policy == "idle")
        while self._running:
            job = self._take()
            if job is None:
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                if now - idle_since < IDLE_S:
                    self._stopped.wait(POLL_S)
                else:
                    self._waiting = True
                    if not self._jobs:  # an offer after this check sees _waiting and wakes us
                        self._wake.wait(1.0)
                    self._waiting = False
                    self._wake.clear()
                continue
            if idle_since is not None:  # waiting for jobs is not waiting for the core
                starvation.restart(time.thread_time())
                idle_since = None
            started = time.monotonic()
            try:
                intra_op = self._run(job)
            except Exception:  # a comparison must never end the worker
                log.exception("shadow_failed", model=job.model, candidate=job.plan.candidate)
                intra_op = 1
            wall = time.monotonic() - started
            # All of the thread's CPU since the last job's is charged: taking the job from the
            # queue and the idling's own system calls count too.
            now = time.thread_time()
            cpu, charged_from = now - charged_from, now
            # With ONNX Runtime's own threads at work this thread's CPU says nothing of starvation.
            starved = starvation.pause(now) if intra_op == 1 else 0.0
            if starved > 0:
                self._stopped.wait(starved)
                starvation.restart(time.thread_time())
            elif (share := idle_after(charged_cpu(cpu, wall, intra_op), wall, self.cpu_share)) > 0:
                idled_from = time.monotonic()
                self._stopped.wait(share)
                starvation.idled(time.monotonic() - idled_from)

    def _run(self, job: ShadowJob) -> int:
        """Run and compare one job; returns the candidate's intra-op thread setting (1: ONNX
        Runtime computed on this thread only)."""
        pair = self._pair(job.model, job.baseline, job.plan.candidate)
        try:
            served = self.catalog.resolve(job.model, job.plan.candidate)
        except ServiceError:
            pair.dropped += 1  # the candidate is not (or no longer) loaded here
            return 1
        run_and_compare(job, served.model, pair, self.priority.idle)
        return served.model.config.session.intra_op_threads

    def figures(self) -> list[tuple[tuple[str, int, int], PairFigures]]:
        """Every (model, baseline, candidate) with its figures so far, for /metrics."""
        return list(self.pairs.items())

    def collector(self) -> Collector:
        return _ShadowCollector(self)


class _ShadowCollector(Collector):
    def __init__(self, shadow: Shadow) -> None:
        self._shadow = shadow

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["model", "baseline", "candidate"]
        families = {
            "compared": CounterMetricFamily("sluice_shadow_compared", "Shadow comparisons made", labels=labels),
            "agreed": CounterMetricFamily("sluice_shadow_agreed", "Shadow comparisons whose outputs agreed",
                                          labels=labels),
            "errors": CounterMetricFamily("sluice_shadow_errors", "Shadow runs the candidate failed", labels=labels),
            "dropped": CounterMetricFamily("sluice_shadow_dropped",
                                           "Shadow jobs dropped (queue full in jobs or bytes, candidate not loaded)",
                                           labels=labels),
            "diff_sum": CounterMetricFamily("sluice_shadow_diff_sum",
                                            "Sum over comparisons of the mean absolute output difference",
                                            labels=labels),
        }
        diff_max = GaugeMetricFamily("sluice_shadow_diff_max", "Largest mean absolute output difference seen",
                                     labels=labels)
        for (model, baseline, candidate), pair in self._shadow.figures():
            values = [model, str(baseline), str(candidate)]
            for name, family in families.items():
                family.add_metric(values, float(getattr(pair, name)))
            diff_max.add_metric(values, pair.diff_max)
        yield from families.values()
        yield diff_max


async def follow_rollouts(shadow: Shadow, catalog: ModelCatalog, etcd: EtcdSettings, stop: asyncio.Event, *,
                          interval: float = 2.0) -> None:
    """Every ``interval``: read the rollout document of each model served here and keep
    ``shadow.rollout_plans`` to those in force (not final). etcd trouble keeps the plans as they
    are and retries: shadowing is never worth failing a service for."""
    client = EtcdClient(etcd)
    schema = KeySchema(etcd.prefix)
    seen: dict[str, int] = {}
    try:
        while not stop.is_set():
            try:
                await client.connect()
                break
            except MeshError as exc:
                log.warning("shadow_etcd_unreachable", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        while not stop.is_set():
            plans: dict[str, ShadowPlan] = {}
            try:
                for model in catalog.model_names():
                    kv = await client.get(schema.rollout(model))
                    if kv is None:
                        continue
                    try:
                        doc = parse_rollout_document(kv.value)
                    except InvalidDocumentError as exc:
                        if seen.get(model) != kv.mod_revision:
                            log.warning("shadow_rollout_invalid", model=model, error=str(exc))
                        seen[model] = kv.mod_revision
                        continue
                    if not doc.state.phase.final and doc.shadow.fraction > 0:
                        plans[model] = ShadowPlan.from_rollout(doc)
                if plans != shadow.rollout_plans:
                    log.info("shadow_plans", plans={m: (p.baseline, p.candidate, p.fraction) for m, p in plans.items()})
                shadow.rollout_plans = plans
            except MeshError as exc:
                log.warning("shadow_rollout_read_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        await client.close()
