"""The shadow worker in its own process (``--shadow-isolation process``): the shared-memory hand-off,
the child's priority, lifecycle (restart, end with the service), and the candidate copy it loads."""

from __future__ import annotations

import json
import os
import pickle
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from services.shadow import ShadowPlan
from services.shadow_ring import DONE, JOB, FrameReader, Ring, encode_job, frame, read_job, write_job
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.test_shadow import SHADOW_ALL, repo_with, send, shadow_counts

PROCESS = ("--shadow-isolation", "process")
linux_only = pytest.mark.skipif(not hasattr(os, "memfd_create") or not Path("/proc/self/task").is_dir(),
                                reason="the process isolation needs Linux (memfd, /proc)")


# -- the hand-off ---------------------------------------------------------------------------------------
def test_the_ring_drops_when_full_in_jobs_or_bytes_and_oversized_jobs() -> None:
    ring = Ring(capacity=1000, max_jobs=3)
    assert ring.allocate(1001) is None  # larger than the whole arena: never fits
    assert [ring.allocate(100), ring.allocate(100), ring.allocate(100)] == [0, 100, 200]
    assert ring.allocate(1) is None  # three jobs queued: full in jobs, bytes to spare
    ring.free(0)
    assert ring.allocate(800) is None  # 700 bytes after 300, 0 before 100: full in bytes
    assert ring.allocate(700) == 300


def test_freed_space_is_reused_in_order_and_out_of_order_frees_wait_for_older_ones() -> None:
    ring = Ring(capacity=1000, max_jobs=10)
    a, b, c = ring.allocate(400, "a"), ring.allocate(400, "b"), ring.allocate(100, "c")
    assert (a, b, c) == (0, 400, 800)
    assert ring.free(400) == "b"  # freed before the older "a": its space stays taken for now
    assert ring.allocate(200) is None  # 100 left at the end, "a" still holds the start
    assert ring.free(0) == "a"  # both now free: the ring wraps to the start
    assert ring.allocate(700, "d") == 0
    assert ring.allocate(200) is None  # [700, 800) free, "c" at 800: no room for 200
    assert ring.allocate(100, "e") == 700
    assert ring.free(12345) is None  # not a job: ignored
    assert ring.clear() == ["c", "d", "e"]  # the tags of the jobs never freed, oldest first
    assert len(ring) == 0 and ring.allocate(1000) == 0  # empty: starts over at the beginning


def test_a_job_round_trips_through_the_arena_with_its_arrays_in_place() -> None:
    arena = memoryview(bytearray(1 << 16))
    feeds: dict[str, npt.NDArray[Any]] = {"x": np.arange(12, dtype=np.float32).reshape(3, 4),
             "t": np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],  # not contiguous: pickled in band
             "w": np.array([b"abc", b""], dtype=np.object_),
             "e": np.zeros((0, 3), dtype=np.float32), "s": np.array(2.5, dtype=np.float64)}
    answers = (np.ones((3, 2), dtype=np.float16),)
    static = pickle.dumps(("m", 2, 3, 0.5, 1e-6, "auto", ("y",), tuple(feeds)))
    header, raws, size = encode_job(static, "id-1", (*feeds.values(), *answers))
    write_job(arena, 128, header, raws)
    got_static, request_id, arrays = read_job(arena, 128, size)
    assert (got_static, request_id) == (pickle.loads(static), "id-1")
    for got, array in zip(arrays, (*feeds.values(), *answers), strict=True):
        assert np.array_equal(got, array) and got.dtype == array.dtype and got.shape == array.shape
    # The float32 input is a view of the arena, not a copy: the child reads it where the service wrote it.
    assert np.shares_memory(arrays[0], np.frombuffer(arena, dtype=np.uint8))


class _Served:
    name, version = "m", 2


def test_an_offer_the_child_has_no_room_for_is_dropped_before_it_is_encoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At 100 % shadow most offers find the queue full while the child keeps to its CPU share:
    they cost a counter read, not the job's encoding (which they would throw away)."""
    from services import shadow_process

    encoded: list[str] = []
    real_encode = shadow_process.encode_job

    def spy(static: bytes, request_id: str, arrays: Any) -> Any:
        encoded.append(request_id)
        return real_encode(static, request_id, arrays)

    monkeypatch.setattr(shadow_process, "encode_job", spy)
    shadow = shadow_process.ProcessShadow(None, queue_size=2)  # type: ignore[arg-type]
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        shadow._view, shadow._jobs_w, shadow._known = memoryview(bytearray(1 << 16)), write_end, frozenset({("m", 3)})
        plan = ShadowPlan(candidate=3, baseline=2)
        feeds, answers = {"x": np.ones((1, 4), np.float32)}, [np.ones((1, 4), np.float32)]

        def offer(request_id: str) -> None:
            shadow._enqueue(_Served(), plan, request_id, feeds=feeds,  # type: ignore[arg-type]
                            names=("y",), answers=answers)

        for i in range(5):
            offer(f"r{i}")
        assert encoded == ["r0", "r1"]  # two handed over; the three others never encoded
        assert shadow.pairs[("m", 2, 3)].dropped == 3
        assert len(os.read(read_end, 1 << 10)) == 2 * JOB.size
        DONE.pack_into(shadow._view, 0, 1)  # the child counted the first job done: room for one
        offer("r5")
        offer("r6")
        assert encoded == ["r0", "r1", "r5"] and shadow.pairs[("m", 2, 3)].dropped == 4
    finally:
        os.close(read_end)
        os.close(write_end)


def test_frames_survive_reads_that_split_them() -> None:
    data = frame(("wants", {("m", 3): "x" * 5000})) + frame(("figures", {}))
    reader = FrameReader()
    got = [message for i in range(0, len(data), 777) for message in reader.feed(data[i:i + 777])]
    assert got == [("wants", {("m", 3): "x" * 5000}), ("figures", {})]


# -- the child in a real service ----------------------------------------------------------------------------
def log_lines(service: ServiceHandle, event: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.process.log_text().splitlines() if f'"{event}"' in line]


def child_pids(service: ServiceHandle) -> list[int]:
    return [int(line["pid"]) for line in log_lines(service, "shadow_process_started")]


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (one its dead parent left for init to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def thread_policies(pid: int) -> list[tuple[int, int]]:
    """(nice, scheduling policy) of each thread of ``pid`` (fields 19 and 41 of its tasks' stat)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (stat := (task / "stat").read_text())[stat.rindex(")") + 2:].split()
        found.append((int(fields[16]), int(fields[38])))
    return found


@linux_only
@pytest.mark.timeout(120)
def test_the_whole_shadow_process_runs_under_sched_idle_and_the_service_has_no_niced_thread(
        tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    service = start_service(repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL), *PROCESS)
    send(service, [1.0] * 5)
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 5, 30, "5 comparisons")
    (child,) = child_pids(service)
    policies = thread_policies(child)
    assert policies and set(policies) == {(19, os.SCHED_IDLE)}  # ONNX Runtime's threads inherited it
    assert all(nice == 0 for nice, _ in thread_policies(service.process.pid))  # no worker thread here
    assert [line["priority"] for line in log_lines(service, "shadow_worker")] == ["idle"]
    # The arena is a memfd: nothing under /dev/shm to unlink or to leak.
    maps = Path(f"/proc/{service.process.pid}/maps").read_text()
    assert "/memfd:sluice-shadow" in maps and "/dev/shm" not in maps


@linux_only
@pytest.mark.timeout(120)
def test_a_killed_shadow_process_is_restarted_and_the_counters_never_go_back(
        tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    service = start_service(repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL), *PROCESS)
    assert send(service, [1.0] * 10) == [2.0] * 10
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 10, 30, "10 comparisons")
    (first,) = child_pids(service)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(child_pids(service)) == 2, 30, "the shadow process restarted")
    died = log_lines(service, "shadow_process_died")
    assert [line["pid"] for line in died] == [first] and died[0]["exit_code"] == -signal.SIGKILL
    assert shadow_counts(service)["compared"] >= 10  # the dead child's figures are kept
    assert send(service, [3.0] * 10) == [6.0] * 10  # the callers never noticed
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 20, 30, "10 comparisons more")
    counts = shadow_counts(service)
    assert counts["agreed"] == counts["compared"] == 20 and counts["errors"] == 0


@linux_only
@pytest.mark.timeout(120)
def test_a_stopped_shadow_process_fills_the_queue_and_offers_beyond_are_dropped(
        tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    service = start_service(repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL), *PROCESS,
                            "--shadow-queue", "4")
    send(service, [1.0])
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 1, 30, "a first comparison")
    (child,) = child_pids(service)
    os.kill(child, signal.SIGSTOP)
    try:
        assert send(service, [float(i) for i in range(30)]) == [2.0 * i for i in range(30)]
        assert shadow_counts(service)["dropped"] >= 30 - 4  # four slots held, the rest dropped at once
    finally:
        os.kill(child, signal.SIGCONT)
    wait_for(lambda: shadow_counts(service).get("compared", 0) + shadow_counts(service).get("dropped", 0) >= 31,
             30, "the queued jobs compared once the child runs again")
    send(service, [5.0] * 4)  # the freed slots are reused
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 1 + 4 + 4, 30, "comparisons after the stop")
    counts = shadow_counts(service)
    assert counts["agreed"] == counts["compared"] and counts["compared"] + counts["dropped"] == 35


@linux_only
@pytest.mark.timeout(120)
def test_the_child_refuses_a_candidate_file_other_than_the_one_the_service_serves(
        tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    repo = repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL)
    service = start_service(repo, *PROCESS, "--no-watch")  # the service keeps the copy it loaded
    send(service, [1.0] * 5)
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 5, 30, "5 comparisons")
    # The file changes under the service, which does not reload it; a restarted child reads the new one.
    models.write_model(repo, "dbl", models.doubler_off_by(0.5), version=3)
    (first,) = child_pids(service)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: bool(log_lines(service, "shadow_candidate_mismatch")), 30, "the changed file refused")
    (refused,) = log_lines(service, "shadow_candidate_mismatch")
    assert (refused["model"], refused["candidate"]) == ("dbl", 3) and "sha256" in refused["reason"]
    dropped = shadow_counts(service)["dropped"]
    send(service, [2.0] * 5)
    wait_for(lambda: shadow_counts(service)["dropped"] >= dropped + 5, 30, "5 jobs dropped")
    counts = shadow_counts(service)
    assert counts["compared"] == counts["agreed"] == 5  # never compared against the other model


@linux_only
@pytest.mark.timeout(120)
def test_the_child_follows_a_reloaded_and_an_unloaded_candidate(
        tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    repo = repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL)
    service = start_service(repo, *PROCESS)
    send(service, [1.0] * 5)
    wait_for(lambda: shadow_counts(service).get("agreed", 0) >= 5, 30, "5 agreeing comparisons")
    models.write_model(repo, "dbl", models.doubler_off_by(0.5), version=3)  # the service reloads it
    wait_for(lambda: len(log_lines(service, "shadow_candidate_loaded")) == 2, 30, "the new copy in the child")
    assert len(log_lines(service, "shadow_candidate_freed")) == 1
    loaded = log_lines(service, "shadow_candidate_loaded")
    assert loaded[0]["sha256"] != loaded[1]["sha256"]
    send(service, [1.0] * 5)
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 10, 30, "5 more comparisons")
    assert shadow_counts(service)["agreed"] == 5  # the new candidate disagrees: it is the one compared

    for path in sorted((repo / "dbl" / "3").iterdir(), reverse=True):
        path.unlink()
    (repo / "dbl" / "3").rmdir()
    wait_for(lambda: len(log_lines(service, "shadow_candidate_freed")) == 2, 30, "the copy freed")
    dropped = shadow_counts(service).get("dropped", 0)
    send(service, [1.0] * 3)
    assert shadow_counts(service)["dropped"] == dropped + 3  # no candidate: dropped at the offer


@linux_only
@pytest.mark.timeout(120)
def test_a_killed_service_takes_its_shadow_process_along_and_leaves_no_shared_memory(
        tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    def ours() -> set[str]:
        return {name for name in os.listdir("/dev/shm") if "sluice" in name or name.startswith("psm_")}

    before = ours()
    service = start_service(repo_with(tmp_path, models.doubler_by_adding(), SHADOW_ALL), *PROCESS)
    send(service, [1.0] * 3)
    wait_for(lambda: shadow_counts(service).get("compared", 0) >= 3, 30, "3 comparisons")
    (child,) = child_pids(service)
    assert running(child)
    service.process.proc.kill()
    service.process.proc.wait(10)
    wait_for(lambda: not running(child), 10, "the shadow process gone with the service")
    assert ours() == before


@linux_only
@pytest.mark.timeout(120)
def test_a_service_that_shadows_nothing_starts_no_shadow_process(
        tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    service = start_service(repo_with(tmp_path, models.doubler_by_adding(), {}), *PROCESS)
    assert send(service, [1.0] * 3) == [2.0] * 3
    children = [pid for task in Path(f"/proc/{service.process.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    assert children == [] and child_pids(service) == []
