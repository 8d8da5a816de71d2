"""Shadow comparison in the real service: requests answered by the baseline re-run on the candidate
after the callers have their answers, compared, counted per (model, baseline, candidate)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.shadow import (
    STARVED_PAUSE_S,
    STARVED_WINDOW_S,
    Policy,
    ShadowPlan,
    Starvation,
    WorkerPriority,
    can_leave_idle,
    charged_cpu,
    compare_outputs,
    idle_after,
    job_bytes,
)
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.clients import RPC_TIMEOUT_S, decode_outputs, raw_request, stub_for

SHADOW_ALL = {"shadow": {"candidate": 3, "baseline": 2, "fraction": 1.0}}


@pytest.fixture(params=["process", "thread"])
def isolation(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The service flags of each shadow isolation: the figures and bounds hold in both."""
    return ("--shadow-isolation", str(request.param))


def shadow_counts(service: ServiceHandle) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(service.metrics_text()):
        for sample in family.samples:
            if sample.name.startswith("sluice_shadow_") and sample.labels.get("model") == "dbl":
                assert (sample.labels["baseline"], sample.labels["candidate"]) == ("2", "3")
                counts[sample.name.removeprefix("sluice_shadow_").removesuffix("_total")] = sample.value
    return counts


def live_requests(service: ServiceHandle, version: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(service.metrics_text()) for s in f.samples
               if s.name == "sluice_requests_total" and s.labels.get("model") == "dbl"
               and s.labels.get("version") == version)


def repo_with(tmp_path: Path, candidate: object, config: Mapping[str, object]) -> Path:
    repo = tmp_path / "repo"
    models.write_model(repo, "dbl", models.doubler(), version=2, config=dict(config))
    models.write_model(repo, "dbl", candidate, version=3)  # type: ignore[arg-type]
    return repo


def send(service: ServiceHandle, values: list[float], version: str = "2") -> list[float]:
    answers = []
    with stub_for(service) as stub:
        for i, value in enumerate(values):
            x = np.array([[value]], dtype=np.float32)
            reply = stub.ModelInfer(raw_request("dbl", {"x": ("FP32", x)}, version=version, request_id=f"req-{i}"),
                                    timeout=RPC_TIMEOUT_S)
            answers.append(float(decode_outputs(reply)["y"][0, 0]))
    return answers


def test_compare_outputs_by_kind() -> None:
    plan = ShadowPlan(candidate=3)
    a = np.array([[1.0, 2.0]], dtype=np.float32)
    close, tiny = compare_outputs(a, a + 1e-7, plan)
    assert close and tiny == pytest.approx(1e-7, rel=0.5)
    agreed, diff = compare_outputs(a, a + 0.5, plan)
    assert not agreed and diff == pytest.approx(0.5)
    assert not compare_outputs(a, a.reshape(2, 1), plan)[0]
    ints = np.array([1, 2, 3], dtype=np.int64)
    assert compare_outputs(ints, ints, plan)[0] and not compare_outputs(ints, ints + 1, plan)[0]
    words = np.array([b"a", b"b"], dtype=np.object_)
    assert compare_outputs(words, words.copy(), plan)[0]
    assert not compare_outputs(words, np.array([b"a", b"c"], dtype=np.object_), plan)[0]
    classes = ShadowPlan(candidate=3, compare="argmax")
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    assert compare_outputs(scores, scores * 0.5, classes)[0]
    assert not compare_outputs(scores, scores[:, ::-1], classes)[0]


@pytest.mark.timeout(120)
def test_agreeing_candidate_is_compared_without_touching_its_live_figures(
        tmp_path: Path, start_service: Callable[..., ServiceHandle], isolation: tuple[str, ...]) -> None:
    service = start_service(repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL), *isolation)
    assert send(service, [float(i) for i in range(40)]) == [2.0 * i for i in range(40)]
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 40, 30, "40 comparisons")
    counts = shadow_counts(service)
    assert counts["agreed"] == counts["compared"] == 40 and counts["errors"] == 0
    assert counts["diff_max"] == 0.0
    assert live_requests(service, "3") == 0  # shadow runs are not the candidate's callers


@pytest.mark.timeout(120)
def test_disagreement_and_candidate_errors_are_counted_and_sampled_in_the_log(
        tmp_path: Path, start_service: Callable[..., ServiceHandle], isolation: tuple[str, ...]) -> None:
    service = start_service(repo_with(tmp_path, models.doubler_off_by(0.5), SHADOW_ALL), *isolation)
    assert send(service, [1.0] * 20) == [2.0] * 20  # callers get the baseline's answers
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 20, 30, "20 comparisons")
    counts = shadow_counts(service)
    assert counts["agreed"] == 0 and counts["diff_sum"] == pytest.approx(20 * 0.5)
    lines = [json.loads(line) for line in service.process.log_text().splitlines() if '"shadow_disagreed"' in line]
    assert 1 <= len(lines) <= 10  # a bounded sample, not one line per request
    assert lines[0]["request_id"] == "req-0" and lines[0]["candidate"] == 3

    failing = start_service(repo_with(tmp_path / "f", models.doubler_failing_above_table(), SHADOW_ALL), *isolation)
    big = float(models.ROLLOUT_TABLE_SIZE + 10)
    assert send(failing, [1.0, big, 2.0, big]) == [2.0, 2 * big, 4.0, 2 * big]
    wait_for(lambda: shadow_counts(failing).get("errors", 0) >= 2, 30, "2 candidate errors")
    counts = shadow_counts(failing)
    assert counts["compared"] == 2 and counts["agreed"] == 2
    assert "shadow_candidate_error" in failing.process.log_text()


@pytest.mark.timeout(120)
def test_a_full_queue_drops_shadow_jobs_and_never_the_callers(
        tmp_path: Path, start_service: Callable[..., ServiceHandle], isolation: tuple[str, ...]) -> None:
    service = start_service(repo_with(tmp_path, models.slow(matmuls=8, size=256), {
        "shadow": {"candidate": 3, "baseline": 2, "fraction": 1.0, "rtol": 1.0, "atol": 1e6}}),
        "--shadow-queue", "1", "--shadow-cpu-share", "0.05", *isolation)
    assert send(service, [1.0] * 60) == [2.0] * 60
    counts = shadow_counts(service)
    assert counts["dropped"] > 0
    assert counts["compared"] + counts["dropped"] <= 60


@pytest.mark.timeout(120)
def test_the_queue_is_bounded_in_bytes_not_only_in_jobs(
        tmp_path: Path, start_service: Callable[..., ServiceHandle], isolation: tuple[str, ...]) -> None:
    # Each job holds 2 x 400 kB (input and answer): a 1 MiB bound queues one, whatever the 64 jobs allow.
    service = start_service(repo_with(tmp_path, models.slow(matmuls=8, size=256), {
        "max_batch_size": 0, "shadow": {"candidate": 3, "baseline": 2, "fraction": 1.0, "rtol": 1.0, "atol": 1e6}}),
        "--shadow-queue", "64", "--shadow-queue-mb", "1", "--shadow-cpu-share", "0.05", *isolation)
    rows = 100_000
    assert job_bytes([np.zeros((rows, 1), np.float32)], [np.zeros((rows, 1), np.float32)]) == 800_000
    with stub_for(service) as stub:
        for i in range(20):
            x = np.full((rows, 1), float(i), dtype=np.float32)
            reply = stub.ModelInfer(raw_request("dbl", {"x": ("FP32", x)}, version="2", request_id=f"big-{i}"),
                                    timeout=RPC_TIMEOUT_S)
            assert float(decode_outputs(reply)["y"][-1, 0]) == 2.0 * i
    counts = shadow_counts(service)
    assert counts["dropped"] > 0
    assert counts.get("compared", 0) + counts["dropped"] <= 20


def test_job_bytes_counts_the_payloads_of_bytes_tensors() -> None:
    words = np.array([b"abc", b"defgh"], dtype=object)
    assert job_bytes([words], []) == words.nbytes + 8


@pytest.mark.timeout(60)
def test_config_shadow_block_is_validated(tmp_path: Path) -> None:
    from services.config import load_model_config
    from services.errors import ModelLoadError

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("shadow: {candidate: 0, fraction: 2}\n")
    with pytest.raises(ModelLoadError) as caught:
        load_model_config(tmp_path / "m")
    assert "shadow.candidate" in str(caught.value) and "shadow.fraction" in str(caught.value)


def niced_threads(pid: int) -> dict[int, int]:
    """Thread id -> scheduling policy of the process's threads at nice 19 (fields 19 and 41 of
    /proc/<pid>/task/<tid>/stat)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[16]) == 19:
            found[int(task.name)] = int(fields[38])
    return found


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or not Path("/proc/self/task").is_dir(),
                    reason="reads Linux thread policies from /proc")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("flag", [None, "nice"])
def test_the_shadow_worker_runs_at_nice_19_and_computes_on_its_own_thread(
        tmp_path: Path, start_service: Callable[..., ServiceHandle], flag: str | None) -> None:
    extra = ("--shadow-policy", flag) if flag else ()
    service = start_service(repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL), *extra,
                            "--shadow-isolation", "thread")
    send(service, [1.0] * 5)
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 5, 30, "5 comparisons")
    # One thread at nice 19: the worker, which ran the candidate itself (intra_op_threads 1: ONNX
    # Runtime made no pool threads that would run at the loading thread's priority). Between jobs
    # it is back under the default policy: SCHED_IDLE only while ONNX Runtime computes, GIL-free.
    assert list(niced_threads(service.process.pid).values()) == [os.SCHED_OTHER]
    started = [json.loads(line) for line in service.process.log_text().splitlines() if '"shadow_worker"' in line]
    expected = "idle" if flag is None and can_leave_idle() else "nice"
    assert [line["priority"] for line in started] == [expected]


def in_a_thread(policy: Policy) -> list[tuple[str, int, int]]:
    """(where, policy, nice) of a throwaway thread around a WorkerPriority(policy).idle() block."""
    seen: list[tuple[str, int, int]] = []

    def look(where: str) -> None:
        seen.append((where, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    def body() -> None:
        priority = WorkerPriority(policy)
        priority.lower()
        look("before")
        with priority.idle():
            look("inside")
        look("after")

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(10)
    return seen


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_sched_idle_is_held_only_inside_the_idle_block() -> None:
    other, idle = os.SCHED_OTHER, os.SCHED_IDLE
    assert in_a_thread("nice") == [("before", other, 19), ("inside", other, 19), ("after", other, 19)]
    if not can_leave_idle():
        pytest.skip("this process may not leave SCHED_IDLE (RLIMIT_NICE 0, no CAP_SYS_NICE): the worker keeps nice 19")
    assert in_a_thread("idle") == [("before", other, 19), ("inside", idle, 19), ("after", other, 19)]


def test_the_duty_cycle_charges_cpu_time_not_wall_time() -> None:
    assert idle_after(0.01, 0.01, 0.25) == pytest.approx(0.03)  # busy 10 ms, idle 30 ms: 25 %
    # Preempted for 40 of 50 ms (what SCHED_IDLE is for): 10 ms of CPU in 50 ms is already 20 %.
    assert idle_after(0.01, 0.05, 0.25) == 0.0
    assert idle_after(0.01, 0.02, 0.25) == pytest.approx(0.02)
    assert idle_after(0.5, 0.5, 1.0) == 0.0
    for cpu, wall in ((0.002, 0.002), (0.002, 0.005), (0.004, 0.01)):
        assert cpu / (wall + idle_after(cpu, wall, 0.25)) <= 0.25 + 1e-12
    # An intra-op pool computes beside the worker: each of its threads counts as busy all along.
    assert charged_cpu(0.002, 0.01, 1) == 0.002
    assert charged_cpu(0.002, 0.01, 4) == pytest.approx(0.04)
    assert charged_cpu(0.002, 0.01, 0) == pytest.approx(0.01 * (os.cpu_count() or 1))


def test_a_worker_starved_of_its_core_steps_aside_and_looks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("services.shadow.time.monotonic", lambda: clock[0])
    starvation = Starvation()
    starvation.restart(cpu_now=0.0)
    clock[0] += STARVED_WINDOW_S / 2
    assert starvation.pause(cpu_now=0.0001) == 0.0  # too short a window to judge
    clock[0] += STARVED_WINDOW_S / 2
    # Runnable for a whole window with 1 ms of CPU: a saturated core. It steps aside.
    assert starvation.pause(cpu_now=0.001) == STARVED_PAUSE_S
    assert starvation.pauses == 1
    starvation.restart(cpu_now=0.001)  # after the pause
    clock[0] += 3 * STARVED_WINDOW_S
    assert starvation.pause(cpu_now=0.002) == STARVED_PAUSE_S
    starvation.restart(cpu_now=0.002)
    clock[0] += STARVED_WINDOW_S
    assert starvation.pause(cpu_now=0.002 + STARVED_WINDOW_S / 10) == 0.0  # it got its CPU: no pause
    assert starvation.pauses == 2
    # Under --shadow-policy nice the worker is meant to make progress however little it gets.
    nice = Starvation(enabled=False)
    nice.restart(cpu_now=0.0)
    clock[0] += 3 * STARVED_WINDOW_S
    assert nice.pause(cpu_now=0.001) == 0.0
    assert nice.pauses == 0


def test_the_shares_idling_between_jobs_is_not_counted_as_waiting_for_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("services.shadow.time.monotonic", lambda: clock[0])

    def jobs(starvation: Starvation, n: int, waited: float) -> float:
        """n jobs of 1 ms CPU, each after ``waited`` s for the core and followed by 19 ms of the
        share's idling; the last job's step-aside (0 for all before it)."""
        pauses = []
        for i in range(n):
            clock[0] += waited + 0.001
            pauses.append(starvation.pause(cpu_now=0.001 * (i + 1)))
            clock[0] += 0.019
            starvation.idled(0.019)
        assert all(p == 0.0 for p in pauses[:-1])
        return pauses[-1]

    # Each job runs as soon as it is taken: the core is free. 95 % of the wall time is idling,
    # and a window made of the rest is never starved, however long it runs.
    free = Starvation()
    free.restart(cpu_now=0.0)
    assert jobs(free, 3000, waited=0.0) == 0.0
    assert free.pauses == 0
    # Each job waits 0.3 s for the core and then runs at once, the share idling after it as
    # before: the waits add up to a window and it steps aside (a window restarted at each idling
    # would never have grown to STARVED_WINDOW_S).
    starved = Starvation()
    starved.restart(cpu_now=0.0)
    n = int(STARVED_WINDOW_S / 0.301) + 1
    assert jobs(starved, n, waited=0.3) == STARVED_PAUSE_S
    assert starved.pauses == 1


def test_allclose_agrees_with_numpy_on_finite_nan_and_infinite_values() -> None:
    rng = np.random.default_rng(7)
    plan = ShadowPlan(candidate=3, rtol=1e-3, atol=1e-4)
    for dtype in (np.float16, np.float32, np.float64):
        base = (rng.standard_normal((4, 8)) * 10).astype(dtype)
        cases = [base.copy(), (base + 1e-5).astype(dtype), (base * 1.01).astype(dtype)]
        for special, other in ((np.nan, np.nan), (np.inf, np.inf), (np.inf, -np.inf), (np.nan, 1.0), (np.inf, 1.0)):
            left, right = base.copy(), base.copy()
            left.flat[3], right.flat[3] = special, other
            cases.append(right)
            assert compare_outputs(left, right, plan)[0] == np.allclose(left, right, rtol=1e-3, atol=1e-4,
                                                                         equal_nan=True), (dtype, special, other)
        for case in cases[:3]:
            expected = np.allclose(base, case, rtol=1e-3, atol=1e-4, equal_nan=True)
            assert compare_outputs(base, case, plan)[0] == expected, dtype
