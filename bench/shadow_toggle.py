"""What a shadow process costs its service, paired: one service and its callers stay up while a
target process is stopped (SIGSTOP) and running (SIGCONT) in alternate slices, and each
running slice's throughput is divided by its pair's stopped one (the order alternates from pair
to pair, so the machine's drift and the slices' order cancel).

    python -m bench.shadow_toggle [--targets shadow,spinner,sleep] [--pairs 40] [--slice 1]
                                  [--clients 32] [--pin] [--serve-args "..."]

Targets: ``shadow``, the service's own shadow process (100 % of the requests shadowed, default
share and policy); ``spinner``, no shadow at all but a bare ``while True: pass`` under
SCHED_IDLE on the service's cores: what a task that only waits for the core costs; ``sleep``, a
``sleep`` process stopped and continued, the method's control (it does nothing either way). With
``--pin`` the callers run on the first core and the service (its shadow process, the spinner)
on the others: a saturated core of its own, where the kernel gives a SCHED_IDLE task almost
nothing and the task still costs. The model and request are :mod:`bench.shadow`'s.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.shadow import MODEL_INFER, Config, _compared, _request, _start, pin_callers, shadow_child, stop, write_repo

TARGETS = ("shadow", "spinner", "sleep")
SPINNER = ("import os\n"
           "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
           "while True:\n"
           "    pass\n")


@dataclass(frozen=True, slots=True)
class Toggled:
    """One target's pairs: (stopped, running) answered requests per second."""

    target: str
    pairs: list[tuple[float, float]]
    compared_per_s: float
    step_asides: int

    @property
    def ratios(self) -> list[float]:
        return [running / stopped for stopped, running in self.pairs if stopped > 0]

    def row(self) -> str:
        ratios = self.ratios
        if len(ratios) < 2:
            return (f"| {self.target} | {len(ratios)} | - | - | - | - | - | {self.compared_per_s:.2f} "
                    f"| {self.step_asides} |")
        low, _, high = statistics.quantiles(ratios, n=4)
        below = sum(r < 1 for r in ratios)
        stopped = statistics.median(p[0] for p in self.pairs)
        running = statistics.median(p[1] for p in self.pairs)
        return (f"| {self.target} | {len(ratios)} | {statistics.median(ratios):.3f} | {low:.3f} to {high:.3f} "
                f"| {below}/{len(ratios)} | {stopped:,.0f} | {running:,.0f} | {self.compared_per_s:.2f} "
                f"| {self.step_asides} |")


HEAD = ("| target | pairs | running / stopped | quartiles | pairs below 1 | req/s stopped | req/s running "
        "| compared/s | step-asides |\n|---|---:|---:|---|---:|---:|---:|---:|---:|")


def _target(name: str, service: subprocess.Popen[bytes], cpus: set[int] | None
            ) -> tuple[int, subprocess.Popen[bytes] | None]:
    """The pid to stop and continue, and the process to end afterwards (None: the service's)."""
    if name == "shadow":
        deadline = time.monotonic() + 30
        while (child := shadow_child(service.pid)) is None:
            if time.monotonic() > deadline:
                raise SystemExit("the service started no shadow process within 30 s")
            time.sleep(0.1)
        return child, None
    command = [sys.executable, "-c", SPINNER] if name == "spinner" else ["sleep", "3600"]
    proc = subprocess.Popen(command)
    if cpus is not None:
        os.sched_setaffinity(proc.pid, cpus)
    return proc.pid, proc


def toggle(port: int, pid: int, clients: int, pairs: int, slice_s: float) -> list[tuple[float, float]]:
    """(stopped, running) req/s for ``pairs`` pairs of slices, ``clients`` closed-loop callers."""
    counts = [0] * clients
    done = threading.Event()
    body = _request()

    def caller(i: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
            while not done.is_set():
                try:
                    call(body, timeout=10)
                except grpc.RpcError:
                    continue
                counts[i] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    out: list[tuple[float, float]] = []
    try:
        time.sleep(2 * slice_s)  # warm-up: connections up, the target running
        for n in range(pairs):
            rate: dict[bool, float] = {}
            for running in (False, True) if n % 2 == 0 else (True, False):
                os.kill(pid, signal.SIGCONT if running else signal.SIGSTOP)
                before, started = sum(counts), time.monotonic()
                time.sleep(slice_s)
                rate[running] = (sum(counts) - before) / (time.monotonic() - started)
            out.append((rate[False], rate[True]))
    finally:
        os.kill(pid, signal.SIGCONT)
        done.set()
        for thread in threads:
            thread.join(15)
    return out


def run(target: str, repo: Path, tmp: Path, *, clients: int, pairs: int, slice_s: float,
        extra: list[str], cpus: set[int] | None) -> Toggled:
    log = tmp / f"service-{target}.log"
    config = Config(1.0) if target == "shadow" else Config(0.0)
    service, port, metrics = _start(repo, config, log, ["--log-level", "info", *extra], cpus)
    spare: subprocess.Popen[bytes] | None = None
    try:
        pid, spare = _target(target, service, cpus)
        compared_from, started = _compared(metrics), time.monotonic()
        got = toggle(port, pid, clients, pairs, slice_s)
        compared = (_compared(metrics) - compared_from) / (time.monotonic() - started)
    finally:
        for proc in (spare, service):
            if proc is not None:
                stop(proc)
    return Toggled(target, got, compared, log.read_text().count('"shadow_stepping_aside"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--slice", type=float, default=1.0, help="seconds per slice")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pin", action="store_true", help="callers on the first core, the service on the others")
    parser.add_argument("--serve-args", default="--max-calls-per-connection 1000",
                        help="more sluice serve flags (default: as in docs/benchmarks.md's pinned runs)")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := [t for t in targets if t not in TARGETS]:
        raise SystemExit(f"unknown target(s) {', '.join(unknown)}: choose from {', '.join(TARGETS)}")
    if not 1 <= args.pairs <= 10_000 or not 0.05 <= args.slice <= 60 or not 1 <= args.clients <= 1024:
        raise SystemExit("--pairs 1..10000, --slice 0.05..60 s, --clients 1..1024")
    service_cpus = pin_callers() if args.pin else None
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repo(Path(tmp))
        for target in targets:
            print(f"{target}: {args.pairs} pairs of {args.slice:g} s slices ...", file=sys.stderr, flush=True)
            rows.append(run(target, repo, Path(tmp), clients=args.clients, pairs=args.pairs, slice_s=args.slice,
                            extra=shlex.split(args.serve_args), cpus=service_cpus).row())
    print(HEAD)
    print("\n".join(rows))
    print(f"\n{args.clients} clients, {'pinned' if args.pin else 'unpinned'}; {os.cpu_count()} cores; load average "
          f"before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
