"""The in-process sampler and the thread dump, on real threads of this test process."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from mesh.observability import profiling


def spin_in_marked_function(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(500))


def wait_in_marked_function(stop: threading.Event) -> None:
    stop.wait(30)


@pytest.fixture
def workers() -> Iterator[threading.Event]:
    stop = threading.Event()
    threads = [threading.Thread(target=spin_in_marked_function, args=(stop,), name="spinner"),
               threading.Thread(target=wait_in_marked_function, args=(stop,), name="waiter")]
    for thread in threads:
        thread.start()
    try:
        yield stop
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_profile_counts_every_thread_by_name_with_its_frames(workers: threading.Event) -> None:
    profile = profiling.sample(0.5, hz=100)
    threads = {thread for thread, _stack in profile.samples}
    assert {"spinner", "waiter"} <= threads
    assert threading.current_thread().name not in threads, "the sampling thread itself is left out"
    spinner = [stack for (thread, stack), _count in profile.samples.items() if thread == "spinner"]
    assert all(any(f.function == "spin_in_marked_function" for f in stack) for stack in spinner)
    assert 20 <= profile.ticks <= 60
    # Each thread is counted once per tick.
    per_thread = sum(count for (thread, _stack), count in profile.samples.items() if thread == "waiter")
    assert per_thread == profile.ticks
    frame = next(f for stack in spinner for f in stack if f.function == "spin_in_marked_function")
    assert frame.file.endswith("test_profiling.py") and not frame.file.startswith("/")


def test_idle_threads_can_be_left_out(workers: threading.Event) -> None:
    profile = profiling.sample(0.3, hz=100, idle=False)
    threads = {thread for thread, _stack in profile.samples}
    assert "spinner" in threads
    assert "waiter" not in threads  # waiting in threading.Event.wait
    assert profile.idle_skipped > 0


def test_collapsed_and_speedscope_output(workers: threading.Event) -> None:
    profile = profiling.sample(0.3, hz=50)
    lines = profile.collapsed().splitlines()
    assert lines
    for line in lines:
        stack, _, count = line.rpartition(" ")
        assert int(count) > 0 and stack.split(";")[0]
    assert any(line.startswith("spinner;") and "spin_in_marked_function (" in line for line in lines)

    document = json.loads(json.dumps(profile.speedscope("test")))
    assert document["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = document["shared"]["frames"]
    by_name = {p["name"]: p for p in document["profiles"]}
    spinner = by_name["spinner"]
    assert spinner["type"] == "sampled" and len(spinner["samples"]) == len(spinner["weights"])
    assert all(0 <= index < len(frames) for stack in spinner["samples"] for index in stack)
    assert any(frames[i]["name"] == "spin_in_marked_function" for stack in spinner["samples"] for i in stack)
    assert spinner["endValue"] == pytest.approx(sum(spinner["weights"]))


@pytest.mark.parametrize(("seconds", "hz"), [(0, 100), (61, 100), (1, 0), (1, 251)])
def test_out_of_range_profiles_are_refused(seconds: float, hz: int) -> None:
    with pytest.raises(ValueError, match=r"seconds|hz"):
        profiling.sample(seconds, hz)


def test_stop_event_ends_a_profile_early() -> None:
    stop = threading.Event()
    stop.set()
    profile = profiling.sample(30, hz=100, stop=stop)
    assert profile.ticks == 0 and profile.seconds < 5


def test_thread_stacks_show_where_each_thread_is(workers: threading.Event) -> None:
    stacks = {s.name: s for s in profiling.thread_stacks()}
    waiter = stacks["waiter"]
    assert "wait_in_marked_function" in [f.function for f in waiter.frames]
    assert waiter.frames[-1].file == "threading.py"  # innermost last: Event.wait's Condition.wait
    assert stacks[threading.current_thread().name].frames[-1].function == "thread_stacks"
    text = profiling.format_thread_stacks([s.to_dict() for s in stacks.values()])
    assert "Thread waiter (ident" in text and "in wait_in_marked_function" in text
    shallow = {s.name: s for s in profiling.thread_stacks(max_depth=2)}["waiter"]
    assert len(shallow.frames) == 2 and shallow.truncated
