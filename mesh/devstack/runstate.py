"""What ``sluice up`` leaves in its run directory (``state.json``) and what later commands make of it.

The state names ``sluice up`` itself and every child it started, each by pid *and* start time
(field 22 of ``/proc/<pid>/stat``, clock ticks since boot): a pid the kernel gave to another
process since is not mistaken for ours. ``sluice down`` stops what is left from it even when
``sluice up`` is gone (killed, or its terminal closed), and ``up``/``env``/``status`` tell a stale or
orphaned stack from a running one.

Without ``/proc`` (not Linux) start times are unknown and a pid that exists counts as ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mesh.registry.settings import parse_endpoint

STATE_FILE = "state.json"
DEFAULT_RUN_DIR = Path(".sluice")
# Stop order of leftovers, as LocalStack.stop: no new traffic first, etcd last.
_STOP_ORDER = ("gateway", "service", "etcd")


def start_time(pid: int, *, zombie: bool = False) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None: no such process, no /proc, or a
    zombie (an exited process that is not running any more) unless ``zombie`` asks for its start
    time too (recording a child that exited at once still names it, not a later owner of the pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] == "X" or (fields[0] == "Z" and not zombie):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Recorded:
    """One process of a stack as the state file names it."""

    name: str
    pid: int
    started: int | None

    @classmethod
    def of(cls, name: str, pid: int) -> Recorded:
        return cls(name, pid, start_time(pid, zombie=True))

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "start_time": self.started}

    def alive(self) -> bool:
        """Whether the process still runs, and is the one recorded (not a reused pid)."""
        if Path("/proc").is_dir():
            # Without a recorded start time the pid cannot be told from a reused one: never ours.
            return self.started is not None and start_time(self.pid) == self.started
        try:  # no /proc: a pid that exists counts as ours
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"{self.name} pid {self.pid}"


def write_state(run_dir: Path, state: dict[str, object]) -> None:
    """Replace the state file atomically (readers never see half of it)."""
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run_dir / STATE_FILE)


def read_state(run_dir: Path) -> dict[str, object]:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remove_state(run_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (run_dir / STATE_FILE).unlink()


def _recorded(entry: object) -> Recorded | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
        return None
    started = entry.get("start_time")
    return Recorded(str(entry.get("name", "?")), entry["pid"], started if isinstance(started, int) else None)


def owner(state: dict[str, object]) -> Recorded | None:
    """The ``sluice up`` process that wrote ``state``."""
    return _recorded({"name": "sluice up", "pid": state.get("pid"), "start_time": state.get("start_time")})


def children(state: dict[str, object]) -> list[Recorded]:
    entries = state.get("children")
    found = [_recorded(entry) for entry in entries] if isinstance(entries, list) else []
    return [entry for entry in found if entry is not None]


def leftovers(state: dict[str, object]) -> list[Recorded]:
    """The recorded children that still run."""
    return [child for child in children(state) if child.alive()]


def running_owner(state: dict[str, object]) -> Recorded | None:
    """The ``sluice up`` of ``state`` if it still runs."""
    up = owner(state)
    return up if up is not None and up.alive() else None


def orphans_message(run_dir: Path, left: list[Recorded]) -> str:
    """What to tell a user who finds a stack's processes running without its ``sluice up``."""
    names = ", ".join(str(child) for child in left)
    return f"a previous stack's processes are still running ({names}): run `sluice down{run_dir_flag(run_dir)}`"


def run_dir_flag(run_dir: Path) -> str:
    """`` --run-dir X`` for commands to print, empty for the default run directory."""
    return "" if run_dir == DEFAULT_RUN_DIR else f" --run-dir {run_dir}"


def _stop_rank(child: Recorded) -> int:
    return next((i for i, prefix in enumerate(_STOP_ORDER) if child.name.startswith(prefix)), len(_STOP_ORDER))


def stop_leftovers(left: list[Recorded], timeout: float) -> list[Recorded]:
    """SIGTERM each leftover's process group (gateway, services, etcd), SIGKILL what outlives
    ``timeout``; returns those still running after that (none, unless they are stuck in the kernel).

    Each child of ``sluice up`` leads its own group (the gateway's Envoy is in the gateway's).
    """
    ordered = sorted(left, key=_stop_rank)
    for rank in sorted({_stop_rank(child) for child in ordered}):
        group = [child for child in ordered if _stop_rank(child) == rank]
        for child in group:
            _signal_group(child, signal.SIGTERM)
        _wait_gone(group, timeout)
        for child in group:
            if child.alive():
                _signal_group(child, signal.SIGKILL)
        _wait_gone(group, 5)
    return [child for child in ordered if child.alive()]


def _signal_group(child: Recorded, signum: int) -> None:
    if not child.alive():
        return  # checked right before: a reused pid is never signalled
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signum)


def _wait_gone(group: list[Recorded], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(child.alive() for child in group) and time.monotonic() < deadline:
        time.sleep(0.1)


def _reachable(endpoint: str) -> bool:
    try:
        host, port, _tls = parse_endpoint(endpoint)
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def hint_for_unreachable_etcd(endpoints: list[str], run_dir: Path = DEFAULT_RUN_DIR) -> str | None:
    """A hint for a command that failed while no etcd answers at ``endpoints`` and a local stack
    runs from ``run_dir`` with another etcd: how to point the command at it. None: nothing to say
    (an etcd answers, so the failure was something else, or no local stack is known)."""
    state = read_state(run_dir)
    etcd = state.get("etcd")
    if not isinstance(etcd, str) or not etcd or etcd in endpoints or any(_reachable(e) for e in endpoints):
        return None
    if running_owner(state) is None:
        left = leftovers(state)
        return orphans_message(run_dir, left) if left else None
    env = f"sluice env{run_dir_flag(run_dir)}"
    return (f"`sluice up` runs a stack from {run_dir} with etcd at {etcd}: run eval \"$({env})\" first "
            f"(or pass --etcd {etcd})")
