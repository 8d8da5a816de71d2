"""What shadow comparison costs the callers: one real service, shadow at 0 %, 10 % and 100 %,
callers' p50 latency and throughput at 1 and 32 concurrent gRPC clients, rounds interleaved.

    python -m bench.shadow [--seconds 3] [--rounds 2]

The model is a stack of 256x256 MatMuls (about 0.3 ms per call on one core), baseline and
candidate the same graph, so every comparison agrees and costs one full candidate run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from mesh.ports import free_port

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _model(layers: int = 6, size: int = 256) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, last = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]))
        last = f"h{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "shadow_bench",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _request(size: int = 256) -> bytes:
    from protos.inference import grpc_service_pb2 as pb

    x = np.ones((1, size), dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="m", model_version="2",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, size])],
        raw_input_contents=[x.tobytes()]).SerializeToString()


def _start(repo: Path, fraction: float, log: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    config = {"max_batch_size": 0, **({"shadow": {"candidate": 3, "baseline": 2, "fraction": fraction}}
                                     if fraction > 0 else {})}
    (repo / "m" / "config.yaml").write_text(yaml.safe_dump(config))
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "serve", "--repo", str(repo), "--port", str(port),
                             "--metrics-port", str(metrics), "--log-level", "warning"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    body = _request()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                probe: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
                probe(body, timeout=1)
            return proc, port, metrics
        except grpc.RpcError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the service did not serve within 60 s: {log.read_text()[-2000:]}")


def _load(port: int, clients: int, seconds: float) -> tuple[float, float]:
    """(p50 ms, requests per second) over ``seconds`` of ``clients`` closed-loop callers."""
    body = _request()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds

    def caller(mine: list[float]) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
            while time.monotonic() < stop:
                started = time.perf_counter()
                call(body, timeout=10)
                mine.append(time.perf_counter() - started)

    threads = [threading.Thread(target=caller, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [v for mine in latencies for v in mine]
    return 1000 * statistics.median(flat), len(flat) / seconds


def _compared(metrics: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sluice_shadow_compared_total"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[tuple[float, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for version in (2, 3):
            (repo / "m" / str(version)).mkdir(parents=True)
            (repo / "m" / str(version) / "model.onnx").write_bytes(_model().SerializeToString())
        for _ in range(args.rounds):
            for fraction in (0.0, 0.1, 1.0):
                proc, port, metrics = _start(repo, fraction, Path(tmp) / "service.log")
                try:
                    for clients in (1, 32):
                        _load(port, clients, 0.5)  # warm-up
                        before = _compared(metrics)
                        p50, rate = _load(port, clients, args.seconds)
                        shadowed = (_compared(metrics) - before) / args.seconds
                        results.setdefault((fraction, clients), []).append((p50, rate, shadowed))
                finally:
                    proc.terminate()
                    proc.wait(20)
    print(f"{'shadow':>7} {'clients':>7} {'p50 ms':>8} {'req/s':>8} {'p50/off':>8} {'req/s/off':>10} "
          f"{'compared/s':>10}")
    for (fraction, clients), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p50 = statistics.median(r[0] for r in rows)
        rate = statistics.median(r[1] for r in rows)
        off = results[(0.0, clients)]
        p50_off, rate_off = statistics.median(r[0] for r in off), statistics.median(r[1] for r in off)
        print(f"{100 * fraction:>6.0f}% {clients:>7} {p50:>8.3f} {rate:>8.0f} {p50 / p50_off:>8.2f} "
              f"{rate / rate_off:>10.2f} {statistics.median(r[2] for r in rows):>10.0f}")


if __name__ == "__main__":
    main()
