"""`sluice up` stops or loses its stack in every way an operator's terminal does, and leaves no
process behind: Ctrl-C on `sluice up 2>&1 | tee up.log` (tee dies of the same Ctrl-C), SIGKILL of
`sluice up` itself, and orphans of an earlier stack that `sluice down` stops and `up`/`env` report.
Real processes throughout: `sluice up` as a command, its etcd, services, gateway and Envoy."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from examples.build_models import build_iris
from mesh.devstack.runstate import start_time
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import ManagedProcess, wait_for
from tests.mesh.devstack.test_command import alive, descendants

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SLUICE = [sys.executable, "-m", "mesh.cli"]


def sluice(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLUICE, *args], capture_output=True, text=True, timeout=90, check=False, cwd=cwd)


def eval_env(run_dir: Path) -> subprocess.CompletedProcess[str]:
    """``eval "$(sluice env)"`` as a user types it; what it says goes to stderr."""
    command = f'eval "$({shlex.join([*SLUICE, "env", "--run-dir", str(run_dir)])})" && env'
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False)


def up_argv(repo: Path, run_dir: Path, services: int) -> list[str]:
    return [*SLUICE, "up", "--repo", str(repo), "--services", str(services), "--run-dir", str(run_dir)]


def stack_pids(run_dir: Path) -> tuple[int, set[int]]:
    """`sluice up`'s pid and every process below it (etcd, services, gateway, Envoy)."""
    up = int(json.loads((run_dir / "state.json").read_text())["pid"])
    return up, descendants(up)


def wait_up(up: ManagedProcess) -> None:
    up.wait_until(lambda: "Press Ctrl-C" in up.log_text(), 150, "the stack up")


@pytest.mark.timeout(300)
def test_ctrl_c_under_tee_stops_the_whole_stack(tmp_path: Path) -> None:
    repo, run_dir, log = tmp_path / "models", tmp_path / "run", tmp_path / "up.log"
    build_iris(repo)
    # A pipeline in its own session, as a shell runs it in the foreground: SIGINT to the group
    # reaches `sluice up` and tee at once, and tee exits before `sluice up` writes its goodbye.
    command = f"{shlex.join(up_argv(repo, run_dir, 2))} 2>&1 | tee {shlex.quote(str(log))} >/dev/null"
    shell = subprocess.Popen(["bash", "-c", command], start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: log.exists() and "Press Ctrl-C" in log.read_text(errors="replace"), 150,
                 "sluice up | tee to report the stack up", interval=0.2)
        up, stack = stack_pids(run_dir)
        assert len(stack) >= 5, stack  # etcd, 2 services, gateway, Envoy
        os.killpg(shell.pid, signal.SIGINT)
        wait_for(lambda: not any(alive(pid) for pid in stack | {up}), 90, "every process of the stack to exit")
        shell.wait(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what a failed test left of the pipeline
            os.killpg(shell.pid, signal.SIGKILL)
    # tee is gone, so the story of the shutdown is in <run-dir>/logs/up.log.
    told = (run_dir / "logs" / "up.log").read_text()
    assert told.index("stopping gateway") < told.index("stopping service-1") < told.index("stopping etcd")
    assert told.rstrip().splitlines()[-1].startswith("sluice up: stopped in ")
    for log in (run_dir / "logs").glob("*.log"):  # each child stopped gracefully, not forced
        assert "SIGTERM again" not in log.read_text(errors="replace"), log

    # Nothing is left to stop, nothing is reported as running, and a new stack starts.
    down = sluice("down", "--run-dir", str(run_dir))
    assert down.returncode == 1 and "no running `sluice up`" in down.stdout, down
    env = eval_env(run_dir)
    assert env.returncode == 1 and "sluice env: no running sluice up" in env.stderr, env
    again = ManagedProcess("sluice-up-again", up_argv(repo, run_dir, 1), tmp_path / "again.log")
    try:
        wait_up(again)
        down = sluice("down", "--run-dir", str(run_dir))  # a live `sluice up`: asked to stop, awaited
        assert down.returncode == 0 and "sluice down: stopped" in down.stdout, down
        assert again.proc.wait(timeout=10) == 0
    finally:
        again.stop()
    assert "sluice up: stopped in " in again.log_path.read_text()


@pytest.mark.timeout(300)
def test_sigkill_of_sluice_up_takes_its_children_along(tmp_path: Path) -> None:
    repo, run_dir = tmp_path / "models", tmp_path / "run"
    build_iris(repo)
    up = ManagedProcess("sluice-up", up_argv(repo, run_dir, 1), tmp_path / "up.log")
    try:
        wait_up(up)
        pid, stack = stack_pids(run_dir)
        assert pid == up.pid and len(stack) >= 4, stack  # etcd, service, gateway, Envoy
        recorded = json.loads((run_dir / "state.json").read_text())["children"]
        assert {child["name"] for child in recorded} == {"etcd", "service-1", "gateway", "rollout-controller"}
        assert all(start_time(child["pid"]) == child["start_time"] for child in recorded)
        assert {child["pid"] for child in recorded} <= stack
        # Next steps name the run directory, so they work as printed.
        assert f'sluice env --run-dir {run_dir})"' in up.log_text()
        assert f"sluice traces --last 1 --run-dir {run_dir}" in up.log_text()
        os.kill(up.pid, signal.SIGKILL)  # only `sluice up`, not its children's groups
        up.proc.wait(timeout=10)
        wait_for(lambda: not any(alive(child) for child in stack), 60, "the children of a killed sluice up to exit")
    finally:
        up.stop()

    env = eval_env(run_dir)
    assert env.returncode == 1 and "is gone" in env.stderr and "start it again" in env.stderr, env
    down = sluice("down", "--run-dir", str(run_dir))
    assert down.returncode == 0 and "left nothing running" in down.stdout, down
    assert not (run_dir / "state.json").exists()


def orphaned_state(run_dir: Path, etcd_pid: int, **extra: object) -> None:
    """The state file a `sluice up` that died without stopping its etcd leaves (on a platform
    without PR_SET_PDEATHSIG, or an etcd that ignored it); its pid is above Linux's pid_max, so gone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    children = [{"name": "etcd", "pid": etcd_pid, "start_time": start_time(etcd_pid)}]
    (run_dir / "state.json").write_text(json.dumps({
        "pid": 2**22 + 1, "start_time": 1, "children": children, "gateway": "127.0.0.1:1",
        "etcd": "127.0.0.1:2", **extra}))


@pytest.mark.timeout(120)
def test_down_stops_what_a_dead_sluice_up_left_and_up_and_env_report_it(tmp_path: Path, etcd: EtcdServer) -> None:
    run_dir = tmp_path / "run"
    etcd_pid = etcd._proc.pid if etcd._proc is not None else 0
    orphaned_state(run_dir, etcd_pid)

    env = eval_env(run_dir)
    assert env.returncode == 1, env
    message = f"a previous stack's processes are still running (etcd pid {etcd_pid}): run `sluice down --run-dir"
    assert message in env.stderr
    up = sluice("up", "--repo", str(tmp_path), "--run-dir", str(run_dir))
    assert up.returncode == 1 and message in up.stdout, up
    assert etcd.alive()  # reported, not doubled and not touched

    down = sluice("down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down
    assert f"stopping what is left running (sluice up pid {2**22 + 1} is gone): etcd pid {etcd_pid}" in down.stdout
    assert "sluice down: stopped" in down.stdout
    wait_for(lambda: not alive(etcd_pid), 10, "the orphaned etcd to exit")
    assert not (run_dir / "state.json").exists()


@pytest.mark.timeout(60)
def test_a_reused_pid_is_not_taken_for_a_child(tmp_path: Path, process_factory: Callable[..., ManagedProcess]) -> None:
    """A recorded pid that now belongs to another process (its start time differs) is neither
    reported nor signalled."""
    stranger = process_factory("stranger", ["sleep", "300"])
    run_dir = tmp_path / "run"
    orphaned_state(run_dir, stranger.pid)
    state = json.loads((run_dir / "state.json").read_text())
    state["children"][0]["start_time"] -= 1  # the process we started is not this one
    (run_dir / "state.json").write_text(json.dumps(state))

    down = sluice("down", "--run-dir", str(run_dir))
    assert down.returncode == 0 and "left nothing running" in down.stdout, down
    assert stranger.alive()
