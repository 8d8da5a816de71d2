"""Hostile and careless requests against a real ``sluice serve``, with well-behaved clients beside them.

Starts one ``sluice serve`` on free loopback ports over a throwaway repository of Identity models
(``identity_fp32``, ``identity_bool``, ``identity_bytes``), then sends N malformed requests of many
kinds (frames that do not parse, wrong shapes and datatypes, shapes whose element count overflows,
BYTES tensors that declare far more elements than they carry, raw and typed contents together, BOOL
bytes other than 0/1, long names, unknown models, non-canonical versions, streams with bad
messages) from a few threads, while well-behaved clients call the same service. Prints, per kind,
how many were sent and which gRPC codes came back, how many were INTERNAL, the service's RSS before,
after and at its peak, and the failures among the well-behaved clients.

    .venv/bin/python -m bench.fuzz                 # 10,000 requests
    .venv/bin/python -m bench.fuzz -n 2000 --kinds garbage,huge-bytes

:data:`KINDS` is also the corpus of tests/services/test_hostile_requests.py: each case carries
the status code and a fragment of the message the service must answer with.
"""

from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/fuzz.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

from bench.propagation import stop as stop_process
from mesh.ports import free_port
from protos.inference import grpc_service_pb2 as pb

SERVICE = "/inference.GRPCInferenceService"
RPC_TIMEOUT_S = 30.0
OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One malformed request: its serialized frame and the answer it must get."""

    kind: str
    frame: bytes
    code: grpc.StatusCode
    fragment: str
    stream: tuple[bytes, ...] = ()
    """For stream cases: the frames sent on one ModelStreamInfer (``frame`` is unused)."""


def request(model: str = "identity_fp32", *, name: str = "x", datatype: str = "FP32",
            shape: tuple[int, ...] = (1, 4), raw: bytes | None = None, version: str = "",
            typed: list[float] | None = None, output: str = "", request_id: str = "") -> bytes:
    """A serialized ModelInferRequest with one input (raw unless ``raw`` is None and typed given)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))
    if typed is not None:
        tensor.contents.fp32_contents.extend(typed)
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id, inputs=[tensor])
    if raw is not None:
        msg.raw_input_contents.append(raw)
    if output:
        msg.outputs.add(name=output)
    return msg.SerializeToString()


GOOD = request(raw=np.arange(4, dtype=np.float32).tobytes())


def _garbage(rng: random.Random) -> Case:
    # Wire type 7 does not exist: whatever follows, the frame cannot parse.
    return Case("garbage", b"\x0f" + rng.randbytes(99), INVALID, "request is not a valid ModelInferRequest")


def _truncated(rng: random.Random) -> Case:
    cut = rng.randrange(len(GOOD) - 15, len(GOOD))  # inside the last field's 16 bytes: cannot parse
    return Case("garbage", GOOD[:cut], INVALID, "request is not a valid ModelInferRequest")


def _cases(kind: str, *items: tuple[bytes, grpc.StatusCode, str]) -> list[Callable[[random.Random], Case]]:
    """Fixed cases of ``kind``: (frame, expected code, fragment of the expected message)."""
    def maker(frame: bytes, code: grpc.StatusCode, fragment: str) -> Callable[[random.Random], Case]:
        return lambda rng: Case(kind, frame, code, fragment)
    return [maker(*item) for item in items]


TWO62 = 2 ** 62
KINDS: dict[str, list[Callable[[random.Random], Case]]] = {
    "garbage": [_garbage, _truncated],
    "wrong-shape": _cases(
        "wrong-shape",
        (request(raw=b"\0" * 12), INVALID, "raw data is 12 bytes, expected 16"),
        (request(shape=(4,), raw=b"\0" * 16), INVALID, "expected shape"),
        (request(shape=(-1, 4), raw=b"\0" * 16), INVALID, "negative dimension"),
    ),
    "wrong-dtype": _cases(
        "wrong-dtype",
        (request(datatype="INT32", raw=b"\0" * 16), INVALID, "expected datatype FP32, got INT32"),
        (request(datatype="FP8", raw=b"\0" * 16), INVALID, "unknown datatype 'FP8'"),
        (request(datatype="Q" * MIB, raw=b"\0" * 16), INVALID, "more characters]"),
    ),
    "overflow-shape": _cases(
        "overflow-shape",
        (request(shape=(0, TWO62), raw=b""), INVALID, "declares more than"),
        (request(shape=(0, TWO62, TWO62), raw=b""), INVALID, "declares more than"),
        (request(shape=(TWO62, 4), raw=b""), INVALID, "declares more than"),
        (request(shape=(2 ** 31,) * 3, raw=b""), INVALID, "declares more than"),
        (request(shape=(1,) * 65, raw=b"\0" * 4), INVALID, "at most 64 are allowed"),
        (request(shape=(0, TWO62), typed=[]), INVALID, "declares more than"),
    ),
    "huge-bytes": _cases(
        "huge-bytes",
        (request("identity_bytes", datatype="BYTES", shape=(1, 300_000_000), raw=b""), INVALID,
         "declares more than"),
        (request("identity_bytes", datatype="BYTES", shape=(1, 10_000_000), raw=b""), INVALID,
         "need at least 40000000 bytes"),
        (request("identity_bytes", datatype="BYTES", shape=(1, 2 ** 40), raw=b""), INVALID, "declares more than"),
        (request("identity_bytes", datatype="BYTES", shape=(TWO62, 4), raw=b""), INVALID, "declares more than"),
        (request("identity_bytes", datatype="BYTES", shape=(1, 1_000_000), raw=b"\0" * 40), INVALID,
         "need at least 4000000 bytes"),
    ),
    "raw-and-typed": _cases(
        "raw-and-typed",
        (request(raw=b"\0" * 16, typed=[1.0, 2.0, 3.0, 4.0]), INVALID, "not both"),
        (request(typed=[1.0, 2.0, 3.0]), INVALID, "fp32_contents has 3 elements, expected 4"),
        (request(shape=(1, 100_000_000), typed=[1.0]), INVALID, "declares more than"),
    ),
    "bad-bool": _cases(
        "bad-bool",
        (request("identity_bool", datatype="BOOL", shape=(1, 4), raw=b"\x00\x01\x02\x01"), INVALID,
         "BOOL element 2 is byte 2"),
        (request("identity_bool", datatype="BOOL", shape=(1, 2), raw=b"\xff\x00"), INVALID,
         "BOOL element 0 is byte 255"),
    ),
    "long-names": _cases(
        "long-names",
        (request(model="m" * MIB, raw=b"\0" * 16), INVALID, "is not a model name"),
        (request(model="../" + "etc", raw=b"\0" * 16), INVALID, "is not a model name"),
        (request(name="x" * MIB, raw=b"\0" * 16), INVALID, "more characters]"),
        (request(raw=b"\0" * 16, output="y" * MIB), INVALID, "unknown output"),
        (request(model="nope", raw=b"\0" * 16, request_id="i" * MIB), NOT_FOUND, "unknown model 'nope'"),
    ),
    "unknown-model": [lambda rng: Case("unknown-model", request(model=f"nope-{rng.randrange(10**6)}",
                                                                raw=b"\0" * 16), NOT_FOUND, "unknown model")],
    "bad-version": _cases(
        "bad-version",
        *[(request(raw=b"\0" * 16, version=v), INVALID, "is not a positive integer")
          for v in ("01", "+1", " 1", "1 ", "0", "-1", "abc", "²", "1" * 30, "9" * MIB)],
        (request(raw=b"\0" * 16, version="9"), NOT_FOUND, "no version 9"),
    ),
    "bad-stream": [lambda rng: Case(
        "bad-stream", b"", OK, "request is not a valid ModelInferRequest",
        stream=(GOOD, b"\x0f" + rng.randbytes(40), request(raw=b"\0" * 12), GOOD))],
}


def every_case() -> Iterator[Case]:
    """Each case of :data:`KINDS` once (the garbage ones with a fixed seed)."""
    rng = random.Random(12)
    for makers in KINDS.values():
        for make in makers:
            yield make(rng)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    stream_errors: tuple[str, ...] = ()
    stream_answers: int = 0


def send(channel: grpc.Channel, case: Case, timeout: float = RPC_TIMEOUT_S) -> Outcome:
    """Send ``case`` as bytes (no client-side serializer, so garbage reaches the server as is)."""
    if case.stream:
        call: Any = channel.stream_stream(f"{SERVICE}/ModelStreamInfer", request_serializer=None,
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        try:
            answers = list(call(iter(case.stream), timeout=timeout))
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "")
        return Outcome(OK, "", tuple(a.error_message for a in answers if a.error_message), len(answers))
    unary: Any = channel.unary_unary(f"{SERVICE}/ModelInfer", request_serializer=None,
                                response_deserializer=pb.ModelInferResponse.FromString)
    try:
        unary(case.frame, timeout=timeout)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    return Outcome(OK, "")


def answered_as_expected(case: Case, outcome: Outcome) -> bool:
    """The expected code with the fragment in its message; a stream: every message answered, the
    bad one with the fragment in its error_message."""
    if outcome.code != case.code:
        return False
    if case.stream:
        return (outcome.stream_answers == len(case.stream)
                and any(case.fragment in error for error in outcome.stream_errors))
    return case.fragment in outcome.details


def build_repo(repo: Path) -> Path:
    for name, elem in (("identity_fp32", TensorProto.FLOAT), ("identity_bool", TensorProto.BOOL),
                       ("identity_bytes", TensorProto.STRING)):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], name,
                                  [helper.make_tensor_value_info("x", elem, ["batch", "width"])],
                                  [helper.make_tensor_value_info("y", elem, ["batch", "width"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = repo / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(path))
    return repo


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Peak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return


def well_behaved(address: str, stop: threading.Event, counts: collections.Counter[str]) -> None:
    """Good calls in a loop, each with a short deadline: a stalled service shows as failures."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    good = request(shape=(2, 4), raw=x.tobytes())
    with grpc.insecure_channel(address) as channel:
        call: Any = channel.unary_unary(f"{SERVICE}/ModelInfer", request_serializer=None,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        while not stop.is_set():
            try:
                answer = call(good, timeout=5.0)
                ok = np.array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 4), x)
                counts["ok" if ok else "wrong answer"] += 1
            except grpc.RpcError as exc:
                counts[f"failed: {exc.code().name}"] += 1
            time.sleep(0.01)


def warm(address: str, threads: int) -> None:
    """Good calls at the run's concurrency first: the handler threads (and their malloc arenas) and
    first-call caches that appear then are not a leak, and would otherwise count as one."""
    def calls() -> None:
        with grpc.insecure_channel(address) as channel:
            for _ in range(100):
                send(channel, Case("warm", GOOD, OK, ""))
    workers = [threading.Thread(target=calls) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def start_service(repo: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "mesh.cli", "serve", "--repo", str(repo), "--port", str(port),
            "--metrics-port", "-1", "--no-watch", "--log-level", "warning", "--log-format", "json"]
    proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(address) as channel:
        ready: Any = channel.unary_unary(f"{SERVICE}/ServerReady",
                                         request_serializer=pb.ServerReadyRequest.SerializeToString,
                                         response_deserializer=pb.ServerReadyResponse.FromString)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"sluice serve exited with {proc.returncode}; see {log}")
            try:
                if ready(pb.ServerReadyRequest(), timeout=0.5).ready:
                    return proc, address
            except grpc.RpcError:
                time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"sluice serve not ready within 60 s; see {log}")


def run(total: int, kinds: list[str], senders: int, clients: int, seed: int, *, settle: float = 0.0) -> int:
    makers = [make for kind in kinds for make in KINDS[kind]]
    with tempfile.TemporaryDirectory(prefix="sluice-fuzz-") as tmp:
        repo = build_repo(Path(tmp) / "repo")
        proc, address = start_service(repo, Path(tmp) / "service.log")
        try:
            warm(address, senders + clients)
            before = rss_mb(proc.pid)
            peak = Peak(proc.pid)
            peak.start()
            stop = threading.Event()
            good: collections.Counter[str] = collections.Counter()
            helpers = [threading.Thread(target=well_behaved, args=(address, stop, good), daemon=True)
                       for _ in range(clients)]
            for thread in helpers:
                thread.start()
            table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
            mismatches: collections.Counter[str] = collections.Counter()
            lock = threading.Lock()
            counter = iter(range(total))
            tenth = [0.0]
            """RSS once a tenth was sent: after the allocator's first high-water mark, before most."""

            def sender(index: int) -> None:
                rng = random.Random(seed * 1000 + index)
                with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)]) as channel:
                    for sent in counter:
                        if sent == total // 10:
                            tenth[0] = rss_mb(proc.pid)
                        case = rng.choice(makers)(rng)
                        outcome = send(channel, case)
                        wrong = not answered_as_expected(case, outcome)
                        with lock:
                            table[case.kind][outcome.code.name] += 1
                            if wrong:
                                mismatches[f"{case.kind}: expected {case.code.name} '{case.fragment}', "
                                           f"got {outcome.code.name} '{outcome.details[:200]}'"] += 1

            started = time.monotonic()
            threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - started
            stop.set()
            for thread in helpers:
                thread.join(10)
            time.sleep(1.0)
            after = rss_mb(proc.pid)
            peak.stop.set()
            peak.join(2)
            if settle > 0:  # what a long-running service keeps once the burst is over
                time.sleep(settle)
            settled = rss_mb(proc.pid)
        finally:
            stop_process(proc)
    internal = sum(c["INTERNAL"] for c in table.values())
    print(f"\n{total} malformed requests in {seconds:.1f} s from {senders} threads, {clients} well-behaved clients\n")
    print(f"| {'kind':<15} | {'sent':>6} | codes received")
    print(f"|{'-' * 17}|{'-' * 8}|{'-' * 40}")
    for kind in kinds:
        codes = table.get(kind, collections.Counter())
        print(f"| {kind:<15} | {sum(codes.values()):>6} | "
              + ", ".join(f"{code} {count}" for code, count in codes.most_common()))
    print(f"\nINTERNAL: {internal}")
    print(f"service RSS: before {before:.0f} MB, after {after:.0f} MB ({(after - before) / before * 100:+.1f} %), "
          f"peak {max(peak.peak, after):.0f} MB")
    if tenth[0]:
        print(f"             after the first tenth {tenth[0]:.0f} MB; over the other nine tenths "
              f"{(after - tenth[0]) / tenth[0] * 100:+.1f} %")
    if settle > 0:
        print(f"             {settle:.0f} s after the run {settled:.0f} MB "
              f"({(settled - before) / before * 100:+.1f} %)")
    failures = sum(v for k, v in good.items() if k != "ok")
    print(f"well-behaved clients: {good['ok']} ok, {failures} failed"
          + (f" ({dict((k, v) for k, v in good.items() if k != 'ok')})" if failures else ""))
    if mismatches:
        print("\nanswers other than expected (count, first 10 kinds):")
        for line, count in mismatches.most_common(10):
            print(f"  {count:>5}  {line}")
    return 1 if internal or failures or mismatches else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=10_000, help="malformed requests (default 10,000)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of: {', '.join(KINDS)}")
    parser.add_argument("--senders", type=int, default=4, help="threads sending malformed requests (default 4)")
    parser.add_argument("--clients", type=int, default=3, help="well-behaved clients beside them (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the run before reading RSS once more (default 0)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    return run(args.requests, kinds, args.senders, args.clients, args.seed, settle=args.settle)


if __name__ == "__main__":
    sys.exit(main())

