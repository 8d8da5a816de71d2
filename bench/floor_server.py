"""The "floor": a bare grpc.aio server that implements only ModelInfer and answers with a canned response.

It parses each request (any server must) and returns a pre-built ``ModelInferResponse`` for the
requested model; nothing else happens. Its throughput is the upper bound for any Python gRPC server on
this machine, so every other target is reported relative to it.

Messages come from tritonclient's generated ``service_pb2`` / ``service_pb2_grpc`` (the same wire
protocol sluice speaks: ``inference.GRPCInferenceService``).

    python -m bench.floor_server --port 9001 --canned mlp=/tmp/mlp.resp.bin --canned heavy=/tmp/h.bin

``--sync`` serves the same answers from grpcio's synchronous server (handler thread pool), the
server design sluice uses: the difference between the two floors is what the server design costs
before any of sluice's own work.

``--sync --model NAME=PATH`` makes it the smallest real server instead: each request's raw tensors
go to onnxruntime (one thread, no batching, no checks) and the outputs come back raw. Next to
the canned floor it shows what running a model at all costs a server; next to sluice, what
sluice's validation, batching, statistics and metrics cost on top.

Each ``--canned`` file holds one serialized ModelInferResponse (written by bench/run.py from the
in-process onnxruntime result for the benchmark input, so the floor's answers are also correct ones).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc


class FloorServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Only ModelInfer; every other RPC keeps the generated UNIMPLEMENTED default."""

    def __init__(self, canned: dict[str, service_pb2.ModelInferResponse]) -> None:
        self._canned = canned

    async def ModelInfer(  # noqa: N802 (generated gRPC method name)
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        response = self._canned.get(request.model_name)
        if response is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"floor: no canned response for {request.model_name!r}")
        return response


class SyncFloorServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The same, on the synchronous server's handler threads."""

    def __init__(self, canned: dict[str, service_pb2.ModelInferResponse]) -> None:
        self._canned = canned

    def ModelInfer(  # noqa: N802 (generated gRPC method name)
        self, request: service_pb2.ModelInferRequest, context: grpc.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        response = self._canned.get(request.model_name)
        if response is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"floor: no canned response for {request.model_name!r}")
        return response


_NUMPY = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT32": "int32", "INT64": "int64",
          "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


class MinimalOrtServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Raw tensors in, onnxruntime, raw tensors out: nothing else."""

    def __init__(self, models: dict[str, str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                          for name, path in models.items()}

    def ModelInfer(  # noqa: N802 (generated gRPC method name)
        self, request: service_pb2.ModelInferRequest, context: grpc.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        import numpy as np

        session = self._sessions.get(request.model_name)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"minimal: no model {request.model_name!r}")
        feeds = {t.name: np.frombuffer(raw, dtype=_NUMPY[t.datatype]).reshape(tuple(t.shape))
                 for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)}
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, feeds)
        response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1")
        for name, array in zip(names, results, strict=True):
            datatype = next(k for k, v in _NUMPY.items() if v == array.dtype.name)
            response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


def serve_sync(port: int, canned: dict[str, service_pb2.ModelInferResponse], host: str, threads: int,
               models: dict[str, str] | None = None) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=None)
    servicer = MinimalOrtServicer(models) if models else SyncFloorServicer(canned)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"floor: cannot bind {host}:{port}")
    server.start()
    print(f"floor (sync, {threads} threads): serving {sorted(canned)} on {host}:{bound}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1.0).wait()


def load_canned(specs: list[str]) -> dict[str, service_pb2.ModelInferResponse]:
    canned = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--canned wants NAME=PATH, got {spec!r}")
        canned[name] = service_pb2.ModelInferResponse.FromString(Path(path).read_bytes())
    return canned


async def serve(port: int, canned: dict[str, service_pb2.ModelInferResponse], host: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(canned), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"floor: cannot bind {host}:{port}")
    await server.start()
    print(f"floor: serving {sorted(canned)} on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description="bare grpc.aio ModelInfer server with canned responses")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--canned", action="append", default=[], metavar="MODEL=PATH")
    parser.add_argument("--sync", action="store_true", help="grpcio's synchronous server instead of grpc.aio")
    parser.add_argument("--threads", type=int, default=128, help="handler threads of the --sync server")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="with --sync: run these ONNX models instead of answering canned responses")
    args = parser.parse_args()
    if args.sync:
        models = dict(spec.partition("=")[::2] for spec in args.model)
        serve_sync(args.port, load_canned(args.canned), args.host, args.threads, models)
    else:
        asyncio.run(serve(args.port, load_canned(args.canned), args.host))


if __name__ == "__main__":
    main()
