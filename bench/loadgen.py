"""Load generation with h2load plus the correctness checks that keep its numbers honest.

h2load speaks plain HTTP/2, so a gRPC call is a POST of a pre-encoded body: the 5-byte gRPC frame
header (compressed flag + big-endian length) followed by a serialized ``ModelInferRequest`` whose
tensors travel in ``raw_input_contents``. h2load counts a gRPC error as a success (HTTP 200 with a
non-zero ``grpc-status`` trailer), so before every measurement:

* one real call with ``tritonclient.grpc`` checks the outputs against in-process onnxruntime, and
* one raw call with the exact bytes h2load will send returns the correct response's size, which is
  compared with the average response size h2load reports afterwards.

KServe v2 REST (the section at the end) goes over HTTP/1.1 (``h2load --h1``) with pre-encoded JSON
or binary-extension bodies, checked the same way with ``tritonclient.http`` and a raw POST.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bench.cpu import CoreProbe, launch_prefix, single_core

MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"


def _add_raw_tensors(tensors: Any, raw_contents: Any, arrays: dict[str, np.ndarray]) -> None:
    """Per array, a tensor entry (name, datatype, shape) in ``tensors`` and its bytes in
    ``raw_contents``: the raw layout of a request's inputs and a response's outputs alike."""
    for name, array in arrays.items():
        tensor = tensors.add()
        tensor.name = name
        tensor.datatype = np_to_triton_dtype(array.dtype)
        tensor.shape.extend(array.shape)
        raw_contents.append(np.ascontiguousarray(array).tobytes())


def client_inputs(infer_input: Callable[..., Any], arrays: dict[str, np.ndarray], **data_options: bool) -> list[Any]:
    """tritonclient inputs holding ``arrays``: ``infer_input`` is grpcclient's or httpclient's
    ``InferInput``, ``data_options`` go to its ``set_data_from_numpy`` (``binary_data`` over REST)."""
    tensors = []
    for name, array in arrays.items():
        tensor = infer_input(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, **data_options)
        tensors.append(tensor)
    return tensors


def encode_request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> bytes:
    """Serialized ModelInferRequest carrying ``inputs`` as raw_input_contents (no gRPC frame)."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    _add_raw_tensors(request.inputs, request.raw_input_contents, inputs)
    return request.SerializeToString()


def encode_response(model: str, outputs: dict[str, np.ndarray], version: str = "1") -> bytes:
    """Serialized ModelInferResponse with raw_output_contents (the floor server's canned answer)."""
    response = service_pb2.ModelInferResponse(model_name=model, model_version=version)
    _add_raw_tensors(response.outputs, response.raw_output_contents, outputs)
    return response.SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """Length-prefixed gRPC message: flag byte 0 (uncompressed) + 4-byte big-endian length + bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class CheckResult:
    ok: bool
    message: str
    response_bytes: int = 0  # size of one correct response message, gRPC frame header included


def _compare(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], rtol: float, atol: float) -> str | None:
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            return f"output {name!r} missing (got {sorted(got)})"
        if have.size != want.size:
            return f"output {name!r} has {have.size} values, expected {want.size}"
        if not np.allclose(have.reshape(want.shape), want, rtol=rtol, atol=atol):
            err = float(np.max(np.abs(have.reshape(want.shape) - want)))
            return f"output {name!r} differs from onnxruntime (max abs err {err:.3g})"
    return None


def check_target(
    port: int,
    model: str,
    inputs: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    body: bytes,
    *,
    timeout: float = 15.0,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> CheckResult:
    """One tritonclient call + one raw call with the benchmark body; both must match onnxruntime."""
    url = f"127.0.0.1:{port}"
    try:
        with grpcclient.InferenceServerClient(url=url) as client:
            result = client.infer(model, client_inputs(grpcclient.InferInput, inputs), client_timeout=timeout)
            got = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
    except InferenceServerException as exc:
        return CheckResult(False, f"tritonclient infer failed: {exc.status()} {exc.message()}")
    problem = _compare(got, expected, rtol, atol)
    if problem:
        return CheckResult(False, f"tritonclient: {problem}")

    raw = raw_call(port, body, timeout)
    if isinstance(raw, str):
        return CheckResult(False, f"raw ModelInfer with the h2load body failed: {raw}")
    parsed = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(raw))
    got_raw = {o.name: parsed.as_numpy(o.name) for o in parsed.get_response().outputs}
    problem = _compare(got_raw, expected, rtol, atol)
    if problem:
        return CheckResult(False, f"raw call: {problem}")
    return CheckResult(True, "ok", response_bytes=len(raw) + 5)


def raw_call(port: int, body: bytes, timeout: float) -> bytes | str:
    """ModelInfer with an already-serialized request; returns the serialized response or an error."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(MODEL_INFER_PATH, request_serializer=None, response_deserializer=None)
        try:
            return call(body, timeout=timeout)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            return f"{exc.code()} {exc.details()}"  # type: ignore[attr-defined]


def wait_until_serving(port: int, body: bytes, timeout: float, alive: object = None) -> str | None:
    """Poll ModelInfer with ``body`` until it succeeds; None when ready, else the last error.

    ``alive`` is an optional callable returning an error string once the server process has died.
    """
    def attempt() -> str | None:
        result = raw_call(port, body, timeout=2.0)
        return None if isinstance(result, bytes) else result

    return _poll(attempt, timeout, alive, "not serving")


def _poll(attempt: Callable[[], str | None], timeout: float, alive: object, what: str) -> str | None:
    """Call ``attempt`` (None once it succeeds, else what failed) every half second until it
    succeeds: None then, else what ``alive`` says once the server died, or the last failure after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if callable(alive):
            died = alive()
            if died:
                return str(died)
        failure = attempt()
        if failure is None:
            return None
        last = failure
        time.sleep(0.5)
    return f"{what} after {timeout:.0f}s: {last}"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class H2Result:
    ok: bool
    message: str
    seconds: float = 0.0
    succeeded: int = 0
    failed: int = 0
    data_bytes: int = 0
    rps: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    server_core_other: float = math.nan  # share of the server core used by other processes
    client_core_other: float = math.nan  # share of the client core used by others than h2load
    not_2xx: int = 0
    """Answers with an HTTP status other than 2xx (REST errors; gRPC errors come as 200)."""
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def avg_response_bytes(self) -> float:
        return self.data_bytes / self.succeeded if self.succeeded else 0.0

    def answers_are(self, size: int, concurrency: int, tolerance: float = 0.02) -> bool:
        """Whether the average answer is ``size`` bytes (errors would change it): within
        ``tolerance``, plus the bytes of the up to ``concurrency`` answers still arriving when a
        timed run ends (h2load counts their bytes but not them; it matters in short runs)."""
        slack = tolerance * size + concurrency * size / max(self.succeeded, 1)
        return abs(self.avg_response_bytes - size) <= slack


_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s|m)\b")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
    r"(\d+) timeout"
)
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def h2load_path() -> str | None:
    return shutil.which("h2load")


GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


@dataclass(frozen=True)
class Protocol:
    """What h2load sends besides the body: the path, the protocol's own headers, HTTP/1.1 or HTTP/2."""

    path: str = MODEL_INFER_PATH
    headers: tuple[str, ...] = GRPC_HEADERS
    h1: bool = False
    """HTTP/1.1 (``--h1``): ``concurrency`` keep-alive connections, one request at a time on each."""


GRPC = Protocol()


def h2load_command(
    port: int,
    body_path: Path,
    concurrency: int,
    *,
    duration: float | None = None,
    requests: int = 0,
    log_path: Path | None = None,
    cpu: str | None = None,
    nice: int = 0,
    headers: Sequence[str] = (),
    scheme: str = "http",
    protocol: Protocol = GRPC,
) -> list[str]:
    """gRPC (the default ``protocol``): one HTTP/2 connection (-c 1) carrying ``concurrency``
    concurrent streams (-m). HTTP/1.1 (``protocol.h1``): ``concurrency`` connections (-c), each with
    one request in flight (-m 1), as that many keep-alive REST clients.

    ``headers`` are extra ``name: value`` request headers (e.g. the gateway's ``x-model-name``);
    ``scheme`` ``https`` makes h2load speak TLS (h2 by ALPN; it does not check the certificate).
    """
    cmd = launch_prefix(cpu, nice)
    if protocol.h1:
        cmd += [h2load_path() or "h2load", "--h1", "-c", str(concurrency), "-t", "1", "-m", "1"]
    else:
        cmd += [h2load_path() or "h2load", "-c", "1", "-t", "1", "-m", str(concurrency)]
    if duration:  # h2load takes whole seconds, or a unit: 0.5 s is "500ms"
        cmd += ["-D", f"{duration:g}" if float(duration).is_integer() else f"{round(duration * 1000)}ms"]
    else:
        cmd += ["-n", str(requests)]
    if log_path is not None:
        cmd.append(f"--log-file={log_path}")
    cmd += [
        "--data",
        str(body_path),
        *(arg for header in (*protocol.headers, *headers) for arg in ("-H", header)),
        f"{scheme}://127.0.0.1:{port}{protocol.path}",
    ]
    return cmd


def run_h2load(
    port: int,
    body_path: Path,
    concurrency: int,
    duration: float,
    *,
    log_path: Path,
    cpu: str | None,
    nice: int = 0,
    warmup_requests: int = 200,
    server_probe: CoreProbe | None = None,
    headers: Sequence[str] = (),
    scheme: str = "http",
    protocol: Protocol = GRPC,
) -> H2Result:
    """Warm up with a fixed request count, then measure for ``duration`` seconds."""
    warm = h2load_command(
        port, body_path, concurrency, requests=max(warmup_requests, 10 * concurrency), cpu=cpu, nice=nice,
        headers=headers, scheme=scheme, protocol=protocol,
    )
    try:
        subprocess.run(warm, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return H2Result(False, "h2load warm-up did not finish within 60s")
    log_path.unlink(missing_ok=True)
    cmd = h2load_command(port, body_path, concurrency, duration=duration, log_path=log_path, cpu=cpu, nice=nice,
                         headers=headers, scheme=scheme, protocol=protocol)
    client_core = single_core(cpu)
    client_probe = CoreProbe(client_core) if client_core is not None else None
    for probe in (server_probe, client_probe):
        if probe is not None:
            probe.start()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired:
        return H2Result(False, f"h2load did not finish within {duration + 60:.0f}s")
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse_h2load(proc.returncode, proc.stdout + proc.stderr, log_path)
    if server_probe is not None:
        result.server_core_other = server_probe.stop()[1]
    if client_probe is not None:
        busy, _ = client_probe.stop()
        h2load_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        result.client_core_other = max(busy - h2load_cpu / max(result.seconds, 1e-9), 0.0)
    return result


def parse_h2load(returncode: int, output: str, log_path: Path) -> H2Result:
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    traffic = _TRAFFIC.search(output)
    if returncode != 0 or not (finished and requests and traffic):
        tail = " | ".join(output.strip().splitlines()[-3:])
        return H2Result(False, f"h2load rc={returncode}: {tail}")
    seconds = float(finished.group(1)) * _UNIT_SECONDS[finished.group(2)]
    succeeded = int(requests.group(4))
    failed = int(requests.group(5)) + int(requests.group(6)) + int(requests.group(7))
    latencies: list[float] = []
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1] == "200":
                latencies.append(int(cols[2]) / 1000.0)
    latencies.sort()
    statuses = _STATUS.search(output)
    not_2xx = sum(int(statuses.group(i)) for i in (2, 3, 4)) if statuses else 0
    return H2Result(
        not_2xx=not_2xx,
        ok=succeeded > 0,
        message="ok" if succeeded else "no request succeeded",
        seconds=seconds,
        succeeded=succeeded,
        failed=failed,
        data_bytes=int(traffic.group(3)),
        rps=succeeded / seconds if seconds else 0.0,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        latencies_ms=latencies,
    )


# --------------------------------------------------------------------------------------------- REST
# KServe v2 REST over HTTP/1.1: a pre-encoded POST /v2/models/{model}/infer, as JSON (``data``
# arrays, what curl sends) or with Triton's binary tensor extension (what tritonclient.http sends by
# default: a JSON header of Inference-Header-Content-Length bytes, then the raw tensors).

REST_KINDS = ("json", "binary")
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RestBody:
    """One REST inference request, ready for h2load: its bytes and the headers they need."""

    kind: str  # json | binary
    body: bytes
    headers: tuple[str, ...]

    def protocol(self, model: str) -> Protocol:
        return Protocol(path=rest_path(model), headers=self.headers, h1=True)


def rest_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def encode_rest(inputs: dict[str, np.ndarray], kind: str) -> RestBody:
    """``json``: every input as a flat ``data`` array, outputs answered as JSON. ``binary``: the exact
    body tritonclient.http sends (inputs as binary sections, ``binary_data_output`` true)."""
    if kind == "json":
        doc = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": np_to_triton_dtype(array.dtype),
                           "data": array.reshape(-1).tolist()} for name, array in inputs.items()]}
        return RestBody(kind, json.dumps(doc).encode(), ("content-type: application/json",))
    if kind != "binary":
        raise ValueError(f"unknown REST body kind {kind!r}; choose from {REST_KINDS}")
    tensors = client_inputs(httpclient.InferInput, inputs, binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(tensors)
    return RestBody(kind, body, ("content-type: application/octet-stream", f"{HEADER_LENGTH}: {json_size}"))


def rest_call(port: int, path: str, body: RestBody, timeout: float) -> tuple[int, dict[str, str], bytes] | str:
    """POST ``body`` on a fresh connection: (status, lower-cased headers, answer) or an error line."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = dict(h.split(": ", 1) for h in body.headers)
        connection.request("POST", path, body=body.body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def decode_rest(headers: dict[str, str], answer: bytes) -> dict[str, np.ndarray]:
    """The outputs of a REST inference answer, JSON or binary."""
    length = headers.get(HEADER_LENGTH.lower())
    result = httpclient.InferResult.from_response_body(
        answer, header_length=int(length) if length else None, content_encoding=headers.get("content-encoding"))
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def check_rest(
    port: int,
    model: str,
    inputs: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    body: RestBody,
    *,
    timeout: float = 15.0,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    client_check: bool = True,
) -> CheckResult:
    """One tritonclient.http call (JSON or binary as ``body``) and one raw POST of the exact bytes
    h2load will send; both must match onnxruntime. ``response_bytes`` is the raw answer's size."""
    binary = body.kind == "binary"
    if client_check:
        try:
            with httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", connection_timeout=timeout,
                                                  network_timeout=timeout) as client:
                tensors = client_inputs(httpclient.InferInput, inputs, binary_data=binary)
                outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in expected]
                result = client.infer(model, tensors, outputs=outputs)
                got = {name: result.as_numpy(name) for name in expected}
        except InferenceServerException as exc:
            raw = rest_call(port, rest_path(model), body, timeout)  # what the server says to the exact bytes
            said = raw if isinstance(raw, str) else f"HTTP {raw[0]} {raw[2][:160].decode(errors='replace')}"
            message = " ".join(f"{exc.status()} {exc.message()}".split())  # tritonclient's holds newlines
            return CheckResult(False, f"tritonclient.http infer ({body.kind}) failed: {message}; "
                                      f"the raw POST answers {' '.join(said.split())}")
        problem = _compare({k: v for k, v in got.items() if v is not None}, expected, rtol, atol)
        if problem:
            return CheckResult(False, f"tritonclient.http ({body.kind}): {problem}")
    raw = rest_call(port, rest_path(model), body, timeout)
    if isinstance(raw, str):
        return CheckResult(False, f"raw POST with the h2load body ({body.kind}) failed: {raw}")
    status, headers, answer = raw
    if status != 200:
        return CheckResult(False, f"raw POST ({body.kind}) answered HTTP {status}: {answer[:200]!r}")
    try:
        got_raw = decode_rest(headers, answer)
    except (ValueError, KeyError, TypeError, InferenceServerException) as exc:
        return CheckResult(False, f"raw POST ({body.kind}): answer does not decode: {exc}")
    problem = _compare(got_raw, expected, rtol, atol)
    if problem:
        return CheckResult(False, f"raw POST ({body.kind}): {problem}")
    return CheckResult(True, "ok", response_bytes=len(answer))


def wait_until_rest(port: int, model: str, body: RestBody, timeout: float, alive: object = None) -> str | None:
    """Poll the REST inference until it answers 200; None when ready, else the last error."""
    def attempt() -> str | None:
        result = rest_call(port, rest_path(model), body, 2.0)
        if isinstance(result, str):
            return result
        return None if result[0] == 200 else f"HTTP {result[0]}: {result[2][:200]!r}"

    return _poll(attempt, timeout, alive, "REST not serving")
