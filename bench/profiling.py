"""What profiling costs the callers of a real service: throughput and p50 at 1 and 32 closed-loop
gRPC clients with nothing running, with a ``/debug/profile`` sampling every thread (100 Hz) for
the whole load, and with tracemalloc on (1 frame), side by side; conditions interleaved in every
round on the same service process, medians over rounds.

    python -m bench.profiling [--seconds 3] [--rounds 3] [--hz 100]

The model is bench.shadow's stack of 256x256 MatMuls (about 0.3 ms per call on one core).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import urllib.request
from pathlib import Path

from bench.shadow import _load, _start, write_repo

CONDITIONS = ("off", "profile", "tracemalloc")


def _admin(metrics: int, method: str, path: str, timeout: float) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{metrics}{path}", method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
    return body


def _measure(port: int, metrics: int, condition: str, clients: int, *, seconds: float, hz: int
             ) -> tuple[float, float]:
    profile: threading.Thread | None = None
    if condition == "tracemalloc":
        _admin(metrics, "POST", "/debug/memory/tracing?on=1&frames=1", 10)
    elif condition == "profile":
        # Sampling covers the whole load (a little before and after it).
        profile = threading.Thread(target=_admin, args=(
            metrics, "GET", f"/debug/profile?seconds={seconds + 0.6:g}&hz={hz}&format=collapsed", seconds + 30))
        profile.start()
    try:
        _load(port, clients, 0.3)
        return _load(port, clients, seconds)
    finally:
        if profile is not None:
            profile.join()
        if condition == "tracemalloc":
            _admin(metrics, "POST", "/debug/memory/tracing?on=0", 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hz", type=int, default=100)
    args = parser.parse_args()
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repo(Path(tmp))  # bench.shadow's request names version 2
        proc, port, metrics = _start(repo, 0.0, Path(tmp) / "service.log")
        try:
            for round_no in range(args.rounds):
                for clients in (1, 32):
                    # Rotate the order each round so no condition always follows another.
                    order = CONDITIONS[round_no % 3:] + CONDITIONS[:round_no % 3]
                    for condition in order:
                        results.setdefault((condition, clients), []).append(
                            _measure(port, metrics, condition, clients, seconds=args.seconds, hz=args.hz))
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"{'condition':>12} {'clients':>7} {'p50 ms':>8} {'req/s':>8} {'p50/off':>8} {'req/s/off':>10} "
          f"(medians of {args.rounds} rounds, {args.seconds:g}s each)")
    for clients in (1, 32):
        off = results[("off", clients)]
        p50_off, rate_off = statistics.median(r[0] for r in off), statistics.median(r[1] for r in off)
        for condition in CONDITIONS:
            rows = results[(condition, clients)]
            p50, rate = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
            print(f"{condition:>12} {clients:>7} {p50:>8.3f} {rate:>8.0f} {p50 / p50_off:>8.2f} "
                  f"{rate / rate_off:>10.2f}")


if __name__ == "__main__":
    main()
