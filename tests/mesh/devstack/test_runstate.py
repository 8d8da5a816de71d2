"""The run state's process identity: a pid is ours only with the start time it was recorded with."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mesh.devstack.runstate import Recorded, start_time


def test_a_pid_without_a_recorded_start_time_is_never_ours() -> None:
    # This process runs, but a record without its start time cannot tell it from a reused pid:
    # `sluice down` must not signal it.
    assert Recorded("etcd", os.getpid(), None).alive() is False
    assert Recorded.of("etcd", os.getpid()).alive() is True
    assert Recorded("etcd", os.getpid(), (start_time(os.getpid()) or 0) + 1).alive() is False


def test_a_child_that_exited_at_once_is_still_recorded_as_itself() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a zombie until reaped below
            with open(f"/proc/{child.pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    break
            time.sleep(0.01)
        recorded = Recorded.of("service", child.pid)
        assert recorded.started is not None
        assert recorded.alive() is False  # exited, not reaped yet: not running
    finally:
        child.wait(10)
    assert recorded.alive() is False
