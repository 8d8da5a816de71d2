"""In-process onnxruntime baseline: ``session.run`` in a loop, one thread, no server, no network.

Run by bench/run.py in a child process pinned to the server core (``taskset -c 0``)::

    python -m bench.ort_inproc --model DIR/mlp/1/model.onnx --input x.npy --duration 5

Prints one JSON object: calls, seconds, rps, p50_ms, p99_ms (per-call latency of ``session.run``).

``--gap-us N`` sleeps N µs before every call (not timed; rps then counts calls per second of
calling): what a server's core does at concurrency 1, idle while the answer travels and the next
request arrives. On a shared virtual machine the caches are cold again after such a gap.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.cpu import core_ticks


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(np.ceil(q / 100.0 * len(sorted_values))))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def measure(model: Path, feeds: dict[str, np.ndarray], duration: float, warmup: float,
            gap_us: float = 0.0) -> dict[str, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    run = session.run
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        run(None, feeds)
    latencies: list[float] = []
    core = os.sched_getaffinity(0)
    probe_core = next(iter(core)) if len(core) == 1 else None
    ticks0 = core_ticks(probe_core) if probe_core is not None else (0, 0)
    cpu0 = time.process_time()
    start = time.perf_counter()
    end = start + duration
    now = start
    gap = gap_us / 1e6
    while now < end:
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter_ns()
        run(None, feeds)
        latencies.append((time.perf_counter_ns() - t0) / 1e6)
        now = time.perf_counter()
    elapsed = now - start
    cpu_used = time.process_time() - cpu0
    other = float("nan")
    if probe_core is not None:
        busy, total = core_ticks(probe_core)
        span = max(total - ticks0[1], 1) / os.sysconf("SC_CLK_TCK")  # seconds of that core
        other = max((busy - ticks0[0]) / os.sysconf("SC_CLK_TCK") - cpu_used, 0.0) / span
    latencies.sort()
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / (elapsed if not gap else sum(latencies) / 1e3),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "other_load": other,  # share of this core used by other processes during the loop
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", action="append", required=True, metavar="NAME=NPY")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=0,
                        help="repeat each input's first row into a batch of this many rows (0: as given); "
                             "rps then counts rows per second")
    parser.add_argument("--gap-us", type=float, default=0.0,
                        help="sleep this long before every call (not timed): calls on an idle core")
    args = parser.parse_args()
    feeds = {}
    for spec in args.input:
        name, _, path = spec.partition("=")
        feeds[name] = np.load(path)
    if args.rows:
        feeds = {name: np.repeat(array[:1], args.rows, axis=0) for name, array in feeds.items()}
    result = measure(args.model, feeds, args.duration, args.warmup, args.gap_us)
    if args.rows:
        result["rps"] *= args.rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()
