"""What the rollout controller's scrape of one instance costs: wall time of the GET, bytes of the
``/metrics`` answer and the controller's CPU to fetch and parse it (``mesh.rollout.figures``),
against a real service serving two versions with shadow comparison on, after some traffic.

    python -m bench.scrape [--scrapes 200] [--seconds 2]

One scrape per instance per controller tick (``--tick``, 1 s): multiply by instances and ticks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.shadow import Config, _load, _start, write_repo
from mesh.rollout.figures import _fetch, parse_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0, help="traffic before scraping (fills the histograms)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repo(Path(tmp))  # bench.shadow's request names version 2
        proc, port, metrics = _start(repo, Config(0.1), Path(tmp) / "service.log", [])
        try:
            _load(port, 4, args.seconds)
            address = f"127.0.0.1:{metrics}"
            walls, cpus, sizes = [], [], []
            for _ in range(args.scrapes):
                wall, cpu = time.perf_counter(), time.process_time()
                text = _fetch(address, 2.0, None, None, 8.0)
                counters = parse_metrics(text, "m", 2, 3)
                cpus.append(time.process_time() - cpu)
                walls.append(time.perf_counter() - wall)
                sizes.append(len(text.encode()))
            assert counters["versions"], "the scrape found no per-version counters"
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"{'scrapes':>8} {'bytes':>8} {'wall p50 ms':>12} {'wall p99 ms':>12} {'controller CPU ms':>18}")
    walls.sort()
    print(f"{args.scrapes:>8} {statistics.median(sizes):>8.0f} {1000 * statistics.median(walls):>12.2f} "
          f"{1000 * walls[int(0.99 * (len(walls) - 1))]:>12.2f} {1000 * statistics.median(cpus):>18.2f}")


if __name__ == "__main__":
    main()
