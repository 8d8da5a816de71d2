"""What the shadow worker costs request threads inside one process, with the machine's noise
paired away: real ONNX Runtime sessions (bench.shadow's model as baseline and candidate), the real
:class:`services.shadow.Shadow` with its worker thread or the real
:class:`services.shadow_process.ProcessShadow` with its child, and request threads that each loop
on what a handler does in Python around inference (parse a ModelInferRequest, run the baseline,
build and serialize the answer, offer it to the shadow). Shadow is switched on and off every
``--slice`` seconds in the same process; each "on" slice is paired with the "off" slice before
it. "Off" is the same plan with a fraction of 0 (no offer is drawn; the worker and the child's
candidate copy stay), so the pair differs only in the comparisons and what they cost.

    python -m bench.shadow_inproc [--seconds 6] [--slice 0.2] [--threads 1,2]
                                  [--isolations thread,process] [--policies idle,nice] [--shares 0.25] [--pin]

``--pin``: the process (its request threads, the worker, the shadow process) on one core, as in a
service given one core with its callers elsewhere. No gRPC and no separate client process: this
isolates the worker's scheduling and its share of the GIL from everything else bench.shadow
measures.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from bench.shadow import _model, _request
from bench.shadow_offer import _Catalog, until_compared
from services.config import ModelConfig
from services.model import OnnxModel
from services.shadow import Shadow, ShadowPlan
from services.shadow_process import ProcessShadow


def _handler(baseline: OnnxModel, shadow: Shadow, body: bytes, stop: threading.Event, counts: list[int]) -> None:
    from protos.inference import grpc_service_pb2 as pb

    while not stop.is_set():
        request = pb.ModelInferRequest.FromString(body)
        feeds = {"x": np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(1, 256)}
        outputs = baseline.run(feeds)
        reply = pb.ModelInferResponse(model_name="m", model_version="2", id=request.id,
                                      outputs=[pb.ModelInferResponse.InferOutputTensor(
                                          name="y", datatype="FP32", shape=[1, 256])],
                                      raw_output_contents=[outputs[0].tobytes()])
        reply.SerializeToString()
        shadow.offer(baseline, request.id, feeds=feeds, names=("y",), answers=outputs)
        counts[0] += 1


def run(baseline: OnnxModel, candidate: OnnxModel, *, policy: str, isolation: str, share: float, fraction: float,
        threads: int, seconds: float, slice_s: float) -> dict[str, float]:
    catalog: Any = _Catalog(baseline, candidate)
    shadow = (ProcessShadow(catalog, policy=policy, cpu_share=share, log_level="warning")  # type: ignore[arg-type]
              if isolation == "process" else Shadow(catalog, policy=policy, cpu_share=share))  # type: ignore[arg-type]
    plan, off = ShadowPlan(candidate=3, baseline=2, fraction=fraction), ShadowPlan(candidate=3, baseline=2, fraction=0)
    shadow.rollout_plans = {"m": off}
    shadow.start()
    _until_compared(shadow, baseline, plan)
    stop = threading.Event()
    counts = [[0] for _ in range(threads)]
    body = _request()
    workers = [threading.Thread(target=_handler, args=(baseline, shadow, body, stop, c)) for c in counts]
    for worker in workers:
        worker.start()
    pairs: list[tuple[float, float]] = []
    off_rate = 0.0
    compared_before = sum(p.compared for _key, p in shadow.figures())
    started = time.monotonic()
    on = False
    try:
        while time.monotonic() - started < seconds:
            shadow.rollout_plans = {"m": plan if on else off}
            total = sum(c[0] for c in counts)
            time.sleep(slice_s)
            rate = (sum(c[0] for c in counts) - total) / slice_s
            if on:
                pairs.append((off_rate, rate))
            off_rate = rate
            on = not on
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        shadow.stop()
    compared = sum(p.compared for _key, p in shadow.figures()) - compared_before
    return {
        "off": statistics.median(p[0] for p in pairs),
        "on": statistics.median(p[1] for p in pairs),
        "ratio": statistics.median(p[1] / p[0] for p in pairs if p[0]),
        "compared_per_s": compared / (seconds / 2),
        "slices": len(pairs),
    }


def _until_compared(shadow: Shadow, baseline: OnnxModel, plan: ShadowPlan) -> None:
    """Under ``plan`` until a first comparison, then back to the plans before."""
    feeds = {"x": np.ones((1, 256), dtype=np.float32)}
    off, shadow.rollout_plans = shadow.rollout_plans, {"m": plan}
    until_compared(shadow, baseline, feeds, baseline.run(feeds))
    shadow.rollout_plans = off


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--slice", type=float, default=0.2)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isolations", default="thread,process")
    parser.add_argument("--policies", default="idle,nice")
    parser.add_argument("--shares", default="0.25", help="comma-separated worker CPU shares")
    parser.add_argument("--pin", action="store_true", help="the whole process on one core")
    args = parser.parse_args()
    if args.pin:  # before any thread (and the shadow process): they inherit the mask
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(_model().SerializeToString())
        config = ModelConfig(max_batch_size=0)
        baseline, candidate = OnnxModel("m", 2, path, config), OnnxModel("m", 3, path, config)
        print("| shadow | request threads | req/s off | req/s on | on / off | compared/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for threads in (int(t) for t in args.threads.split(",")):
            for isolation in args.isolations.split(","):
                for policy in args.policies.split(","):
                    for share in (float(v) for v in args.shares.split(",")):
                        for fraction in (0.1, 1.0):
                            r: dict[str, Any] = run(baseline, candidate, policy=policy, isolation=isolation,
                                                    share=share, fraction=fraction, threads=threads,
                                                    seconds=args.seconds, slice_s=args.slice)
                            print(f"| {100 * fraction:.0f} % {isolation} {policy}, share {100 * share:g} % "
                                  f"| {threads} | {r['off']:,.0f} | {r['on']:,.0f} | {r['ratio']:.3f} "
                                  f"| {r['compared_per_s']:,.0f} |", flush=True)
    print(f"\n{os.cpu_count()} cores; load average before: {', '.join(f'{v:.2f}' for v in load)}, "
          f"after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.slice} s slices"
          + ("; pinned to one core" if args.pin else ""))


if __name__ == "__main__":
    main()
