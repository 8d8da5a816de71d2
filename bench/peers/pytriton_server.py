"""NVIDIA PyTriton 0.7 peer: serve ONNX models through a Python callable that runs onnxruntime.

Runs inside its own venv (bench/.venvs/pytriton), started by bench/targets.py as::

    python bench/peers/pytriton_server.py --repo DIR --models mlp,heavy --grpc-port P \
        --http-port H --metrics-port M --workspace WS

Each model is bound with Triton's dynamic batcher (max_queue_delay 0, max_batch_size 32), so requests
queued while the callable runs are batched into one onnxruntime call. Pitfalls handled by the caller:
the Python backend stub needs LD_LIBRARY_PATH to hold this interpreter's libpython folder, and an
explicit ``workspace=`` keeps PyTriton's sockets out of a shared /tmp.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}


def make_infer(session: ort.InferenceSession) -> Callable[..., dict[str, np.ndarray]]:
    output_names = [o.name for o in session.get_outputs()]

    @batch  # type: ignore[misc]
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        results = session.run(output_names, inputs)
        # Outputs with only a batch dimension (e.g. iris "label") are declared as shape (1,) to Triton.
        return {n: r.reshape(-1, 1) if r.ndim == 1 else r for n, r in zip(output_names, results, strict=True)}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--models", default="mlp,heavy")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Without a handler SIGTERM kills only this process and orphans tritonserver and its Python stubs;
    # exiting through the `with` block stops them. (bench/targets.py also signals the whole group.)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=10,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        for name in args.models.split(","):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            path = args.repo / name / "1" / "model.onnx"
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            # Triton shapes exclude the batch dimension.
            inputs = [
                Tensor(name=i.name, dtype=ORT_TO_NUMPY[i.type], shape=tuple(i.shape[1:])) for i in session.get_inputs()
            ]
            outputs = [
                Tensor(name=o.name, dtype=ORT_TO_NUMPY[o.type], shape=tuple(o.shape[1:]) or (1,))
                for o in session.get_outputs()
            ]
            triton.bind(
                model_name=name,
                infer_func=make_infer(session),
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(
                    max_batch_size=args.max_batch_size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=0),
                ),
            )
        print(f"pytriton: serving {args.models} on grpc :{args.grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
