"""What :meth:`services.shadow.Shadow.offer` costs the request thread, per isolation: the real
thread worker or the real shadow process (with its child consuming), bench.shadow's model as
baseline and candidate, each call timed on its own. Two ways: one offer every ``--interval``
with the worker at a 25 % CPU share (it takes them faster than they come, so the offers measured
are handed over: the job described and copied), and offers back to back (the queue is full
almost always, so nearly all of them are dropped: what an offer costs at 100 % shadow while the
worker keeps to its share).

    python -m bench.shadow_offer [--offers 2000] [--interval 0.002]

bench.shadow runs it after its service measurements and prints the table beside them.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import structlog

from services.config import ModelConfig
from services.model import OnnxModel
from services.shadow import Shadow, ShadowPlan
from services.shadow_process import ProcessShadow


@dataclass(frozen=True)
class OfferCost:
    p50_us: float
    p90_us: float
    p99_us: float
    dropped: int


class _Served:
    def __init__(self, model: OnnxModel) -> None:
        self.model = model


class _Catalog:
    """What the shadow reads of a catalog: the served versions (to load the candidate) and the
    candidate's lookup (thread worker)."""

    def __init__(self, baseline: OnnxModel, candidate: OnnxModel) -> None:
        self._versions = {2: _Served(baseline), 3: _Served(candidate)}
        self._served = MappingProxyType({"m": MappingProxyType(self._versions)})

    def served(self) -> Any:
        return self._served

    def resolve(self, name: str, version: int | None) -> _Served:
        return self._versions[version or 3]


def until_compared(shadow: Shadow, baseline: OnnxModel, feeds: dict[str, Any], answers: Any) -> None:
    """Offers under the plans in force until a first comparison: the worker (the shadow process:
    its interpreter, ONNX Runtime and candidate copy) is ready. On a busy machine a SCHED_IDLE
    child takes a while to get there."""
    deadline = time.monotonic() + 60
    while not any(p.compared for _k, p in shadow.figures()) and time.monotonic() < deadline:
        shadow.offer(baseline, "warm-up", feeds=feeds, names=("y",), answers=answers)
        time.sleep(0.05)


def offer_cost(baseline_path: Path, isolation: str, offers: int, interval: float = 0.002,
               cpu_share: float = 0.25) -> OfferCost:
    """Time ``offers`` offers of one request (1x256 FP32 in and out) at 100 % shadow."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    config = ModelConfig(max_batch_size=0)
    baseline = OnnxModel("m", 2, baseline_path, config)
    candidate = OnnxModel("m", 3, baseline_path.parent.parent / "3" / baseline_path.name, config)
    catalog: Any = _Catalog(baseline, candidate)
    shadow = (ProcessShadow(catalog, log_level="warning", cpu_share=cpu_share) if isolation == "process"
              else Shadow(catalog, cpu_share=cpu_share))
    shadow.rollout_plans = {"m": ShadowPlan(candidate=3, baseline=2, fraction=1.0)}
    shadow.start()
    feeds = {"x": np.ones((1, 256), dtype=np.float32)}
    answers = baseline.run(feeds)
    try:
        until_compared(shadow, baseline, feeds, answers)
        before = sum(pair.dropped for _key, pair in shadow.figures())
        times = []
        for i in range(offers):
            started = time.perf_counter_ns()
            shadow.offer(baseline, f"r{i}", feeds=feeds, names=("y",), answers=answers)
            times.append(time.perf_counter_ns() - started)
            time.sleep(interval)
        dropped = sum(pair.dropped for _key, pair in shadow.figures()) - before
    finally:
        shadow.stop()
    cuts = statistics.quantiles(times, n=100)
    return OfferCost(statistics.median(times) / 1000, cuts[89] / 1000, cuts[98] / 1000, dropped)


def main() -> None:
    from bench.shadow import _model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offers", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=0.002)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for version in (2, 3):
            (Path(tmp) / str(version)).mkdir()
            (Path(tmp) / str(version) / "model.onnx").write_bytes(_model().SerializeToString())
        print(TABLE_HEAD)
        for isolation in ("thread", "process"):
            for interval in (args.interval, 0.0):
                cost = offer_cost(Path(tmp) / "2" / "model.onnx", isolation, args.offers, interval)
                print(row(isolation, interval, cost, args.offers), flush=True)


TABLE_HEAD = ("| isolation | offers | offer µs p50 | offer µs p90 | offer µs p99 | dropped |\n"
              "|---|---|---:|---:|---:|---:|")


def row(isolation: str, interval: float, cost: OfferCost, offers: int) -> str:
    how = f"one per {1000 * interval:g} ms" if interval else "back to back"
    return (f"| {isolation} | {how} | {cost.p50_us:.1f} | {cost.p90_us:.1f} | {cost.p99_us:.1f} "
            f"| {cost.dropped} of {offers} |")


if __name__ == "__main__":
    main()
