"""The shadow process: runs a service's shadow comparisons away from its GIL.

Started by :class:`services.shadow_process.ProcessShadow` as ``python -m services.shadow_child``
with the arena and three pipes as inherited file descriptors. The whole process runs under
SCHED_IDLE (or nice 19 with ``--policy nice``), set before anything else starts a thread, so
ONNX Runtime's threads inherit it, and it never needs to come back: no handler thread waits on a
GIL this process holds. It loads its own copy of each candidate the service tells it about,
refusing one whose file is not the one the service loaded; runs and compares the jobs in order,
freeing each one's space; idles after each job so that its CPU time (all its threads') stays
within ``--cpu-share`` of one core; and sends its figures, cumulative, to the service, which adds
them to /metrics. It ends when the service does: at end of file on its pipes, or by
PR_SET_PDEATHSIG when the service dies without closing them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (the service's supervisor
    thread, which lives as long as the service's shadow); exit now if the service is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def lower_process(policy: str) -> str:
    """Nice 19, and SCHED_IDLE for ``idle``, on the only thread so far: every thread started after
    inherits both. Returns what it got (``idle``, ``nice`` or ``normal``)."""
    got = "normal"
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        got = "nice"
    if policy == "idle":
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            got = "idle"
    return got


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="services.shadow_child")
    for name in ("parent", "arena-fd", "arena-bytes", "jobs-fd", "control-fd", "figures-fd"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--policy", choices=("idle", "nice"), default="idle")
    parser.add_argument("--cpu-share", type=float, default=0.05)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="auto")
    parser.add_argument("--log-levels", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the service, which stops us
    got = lower_process(args.policy)
    # Imported only now, under the lowered priority: ONNX Runtime and numpy may start threads.
    from mesh.observability import logging as sluice_logging  # noqa: PLC0415

    sluice_logging.configure(args.log_level, args.log_format, sluice_logging.parse_levels(args.log_levels))
    from services.shadow_worker import ChildWorker  # noqa: PLC0415

    worker = ChildWorker(args.arena_fd, args.arena_bytes, jobs_fd=args.jobs_fd, control_fd=args.control_fd,
                         figures_fd=args.figures_fd, cpu_share=args.cpu_share, step_aside=args.policy == "idle")
    worker.log_start(got)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
