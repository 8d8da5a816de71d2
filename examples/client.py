"""Call a sluice model with the stock Triton clients (``tritonclient.grpc``, ``tritonclient.http``), unchanged.

sluice speaks the KServe v2 / Triton protocol over gRPC and REST, so any Triton client works::

    python examples/client.py --url 127.0.0.1:8001                  # iris, latest version
    python examples/client.py --url 127.0.0.1:8001 --version 1      # iris version 1 (LogisticRegression)
    python examples/client.py --url 127.0.0.1:8001 --model mlp      # 3 random rows through the tiny MLP
    python examples/client.py --url $SLUICE_GATEWAY --ca $SLUICE_CA --token $SLUICE_TOKEN   # TLS + JWT
    python examples/client.py --url $SLUICE_GATEWAY --protocol rest    # KServe v2 REST (HTTP/JSON)

With ``--protocol rest`` the calls are HTTP (tritonclient.http, Triton's binary tensor extension):
to a service's REST port, or to the gateway, whose REST routes take the model and version from
the path, so no routing header is sent.

``--ca`` and ``--token`` default to ``$SLUICE_CA`` and ``$SLUICE_TOKEN`` (what ``sluice env`` and
``sluice token`` give for a ``sluice up --secure``): with a CA the call goes over TLS, checked
against it; a token is sent as ``authorization: Bearer <token>``.

Exit status: 0 on success, 2 if the server cannot be reached or is not ready, 3 if the model or
version is unknown or not ready (gRPC NOT_FOUND or INVALID_ARGUMENT, from any call: through the
gateway even the server checks carry the model's headers), 4 if the inference call fails. Over
REST the same codes follow the HTTP status: 400 and 404 name the model or version (3), 503 and
504 or no connection at all mean unreachable (2).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

# Three rows of sklearn's iris data set, one per class (setosa, versicolor, virginica).
IRIS_ROWS = np.array(
    [[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.3, 3.3, 6.0, 2.5]],
    dtype=np.float32,
)
IRIS_CLASSES = ("setosa", "versicolor", "virginica")

EXIT_UNREACHABLE = 2
EXIT_MODEL = 3
EXIT_INFER = 4
# A gateway that answers is reachable: these codes name the model or version, whatever the call.
MODEL_CODES = frozenset({"StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"})
UNREACHABLE_CODES = frozenset({None, "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"})
# The same over REST (tritonclient.http gives the HTTP status as the exception's status).
REST_MODEL_CODES = frozenset({"400", "404"})
REST_UNREACHABLE_CODES = frozenset({None, "503", "504"})

NUMPY_DTYPES: dict[str, Any] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _call_failed(exc: InferenceServerException, stage_code: int, what: str, *, rest: bool = False) -> int:
    """The documented exit code for a failed call: by its gRPC code (HTTP status) first, else by the stage."""
    status = exc.status()
    if status in (REST_MODEL_CODES if rest else MODEL_CODES):
        return _fail(EXIT_MODEL, f"{what}: {exc.message()} ({status})")
    if stage_code == EXIT_UNREACHABLE and status not in (REST_UNREACHABLE_CODES if rest else UNREACHABLE_CODES):
        # It answered: not "unreachable", but not usable either.
        return _fail(EXIT_UNREACHABLE, f"{what}: the server answers with an error ({status}: {exc.message()})")
    return _fail(stage_code, f"{what}: {exc.message()} ({status or 'no status'})")


def _make_inputs(model: str, metadata: Any, rows: int, seed: int, client_module: Any = grpcclient) -> list[Any]:
    """Iris gets the three canned rows; any other model gets seeded random rows shaped from its metadata.

    ``metadata`` is tritonclient.grpc's message or tritonclient.http's dict, ``client_module`` the
    one whose ``InferInput`` to build.
    """
    specs = [(m["name"], m["datatype"], m["shape"]) for m in metadata.get("inputs", [])] \
        if isinstance(metadata, dict) else [(m.name, m.datatype, m.shape) for m in metadata.inputs]
    if model == "iris":
        name = specs[0][0] if specs else "input"
        tensor = client_module.InferInput(name, list(IRIS_ROWS.shape), "FP32")
        tensor.set_data_from_numpy(IRIS_ROWS)
        return [tensor]
    if not specs:
        raise ValueError(f"model {model!r} publishes no input metadata; cannot make up inputs for it")
    rng = np.random.default_rng(seed)
    inputs = []
    for name, datatype, dims in specs:
        dtype = NUMPY_DTYPES.get(datatype)
        if dtype is None:
            raise ValueError(f"input {name!r} has datatype {datatype}; this example can't fill it")
        # Replace every dynamic (-1) dimension: the first by the row count, any other by 1.
        shape = [int(d) for d in dims]
        shape = [rows if i == 0 and d < 0 else (1 if d < 0 else d) for i, d in enumerate(shape)]
        data = rng.standard_normal(shape).astype(dtype)
        tensor = client_module.InferInput(name, shape, datatype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def _print_result(model: str, result: Any) -> None:
    response = result.get_response()
    outputs = response.get("outputs", []) if isinstance(response, dict) else response.outputs
    names = [o["name"] if isinstance(o, dict) else o.name for o in outputs]
    if model == "iris" and {"label", "probabilities"} <= set(names):
        labels = result.as_numpy("label").reshape(-1)  # some servers return [N, 1]
        probs = result.as_numpy("probabilities")
        for row, label, p in zip(IRIS_ROWS, labels, probs, strict=True):
            pretty = ", ".join(f"{c}={v:.3f}" for c, v in zip(IRIS_CLASSES, p, strict=True))
            name = IRIS_CLASSES[int(label)]
            print(f"  {[round(float(v), 1) for v in row]} -> label {int(label)} ({name}); {pretty}")
        return
    np.set_printoptions(precision=4, suppress=True, linewidth=100, threshold=40)
    for name in names:
        value = result.as_numpy(name)
        print(f"  {name}: shape {list(value.shape)} dtype {value.dtype}")
        print("   ", str(value).replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Call a sluice (KServe v2 / Triton gRPC) model.")
    parser.add_argument("--url", default="127.0.0.1:8001", help="host:port of the gRPC endpoint")
    parser.add_argument("--model", default="iris", help="model name (default: iris)")
    parser.add_argument("--version", default="", help='model version; "" = the server picks (latest)')
    parser.add_argument("--rows", type=int, default=3, help="rows to send for non-iris models")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed for non-iris inputs")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--ca", default=os.environ.get("SLUICE_CA") or None,
                        help="PEM CA certificate: call over TLS and check the server against it (default $SLUICE_CA)")
    parser.add_argument("--token", default=os.environ.get("SLUICE_TOKEN") or None,
                        help="bearer token sent with every call (default $SLUICE_TOKEN)")
    parser.add_argument("--protocol", choices=("grpc", "rest"), default="grpc",
                        help="grpc (tritonclient.grpc, default) or rest (tritonclient.http, KServe v2 REST)")
    args = parser.parse_args(argv)
    if args.protocol == "rest":
        return _main_rest(args)

    try:
        if args.ca:
            client = grpcclient.InferenceServerClient(url=args.url, ssl=True, root_certificates=args.ca)
        else:
            client = grpcclient.InferenceServerClient(url=args.url)
    except (InferenceServerException, OSError) as exc:
        return _fail(EXIT_UNREACHABLE, f"cannot create a client for {args.url}: {exc}")

    # Through the sluice gateway (Envoy) these headers pick the route; a service ignores them.
    headers = {"x-model-name": args.model}
    if args.version:
        headers["x-model-version"] = args.version
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    with client:
        what = f"server at {args.url}"
        try:
            live = client.is_server_live(client_timeout=args.timeout, headers=headers)
            ready = client.is_server_ready(client_timeout=args.timeout, headers=headers)
        except InferenceServerException as exc:
            if exc.status() in UNREACHABLE_CODES:
                return _fail(EXIT_UNREACHABLE, f"{what} is unreachable ({exc.status() or 'no status'}: "
                                               f"{exc.message()}).\n"
                                               "       Is it running? e.g. `sluice serve --repo DIR --port 8001`")
            return _call_failed(exc, EXIT_UNREACHABLE, f"model {args.model!r} through {args.url}")
        if not (live and ready):
            return _fail(EXIT_UNREACHABLE, f"{what} answers but is not ready (live={live}, ready={ready})")
        print(f"server {args.url}: live, ready")

        shown_version = args.version or "latest"
        try:
            model_ready = client.is_model_ready(args.model, args.version, client_timeout=args.timeout, headers=headers)
        except InferenceServerException as exc:
            return _call_failed(exc, EXIT_MODEL, "model readiness check failed")
        if not model_ready:
            return _fail(EXIT_MODEL, f"model {args.model!r} version {shown_version} is not ready (or unknown)")
        try:
            metadata = client.get_model_metadata(args.model, args.version, client_timeout=args.timeout, headers=headers)
        except InferenceServerException as exc:
            return _call_failed(exc, EXIT_MODEL, f"cannot read metadata of {args.model!r}")
        print(f"model {metadata.name!r} versions {list(metadata.versions)} ready ({metadata.platform})")

        try:
            inputs = _make_inputs(args.model, metadata, args.rows, args.seed)
        except ValueError as exc:
            return _fail(EXIT_INFER, str(exc))
        # Ask for every output the metadata lists (none listed: the server sends all of them).
        outputs = [grpcclient.InferRequestedOutput(o.name) for o in metadata.outputs] or None
        try:
            result = client.infer(
                args.model,
                inputs,
                model_version=args.version,
                outputs=outputs,
                client_timeout=args.timeout,
                headers=headers,
            )
        except InferenceServerException as exc:
            return _fail(EXIT_INFER, f"inference failed ({exc.status()}): {exc.message()}")
        response = result.get_response()
        print(f"response from {response.model_name!r} version {response.model_version or '?'}:")
        _print_result(args.model, result)
    return 0


def _main_rest(args: argparse.Namespace) -> int:
    """The same calls over KServe v2 REST; the path names the model, so no routing header."""
    try:
        client = httpclient.InferenceServerClient(
            url=args.url, connection_timeout=args.timeout, network_timeout=args.timeout,
            ssl=bool(args.ca), ssl_options={"ca_certs": args.ca} if args.ca else None)
    except (InferenceServerException, OSError, ValueError) as exc:
        return _fail(EXIT_UNREACHABLE, f"cannot create a client for {args.url}: {exc}")
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    what = f"server at {args.url}"
    try:
        return _rest_calls(client, args, headers, what)
    except OSError as exc:  # refused, reset, timed out: tritonclient.http passes the socket's errors on
        return _fail(EXIT_UNREACHABLE, f"{what} is unreachable ({type(exc).__name__}: {exc}).\n"
                                       "       Is it running? e.g. `sluice serve --repo DIR --port 8001` "
                                       "(REST on port + 2)")
    finally:
        client.close()


def _rest_calls(client: httpclient.InferenceServerClient, args: argparse.Namespace, headers: dict[str, str],
                what: str) -> int:
    try:
        live = client.is_server_live(headers=headers)
        ready = client.is_server_ready(headers=headers)
    except InferenceServerException as exc:
        if exc.status() in REST_UNREACHABLE_CODES:
            return _fail(EXIT_UNREACHABLE, f"{what} is unreachable ({exc.status() or 'no status'}: {exc.message()})")
        return _call_failed(exc, EXIT_UNREACHABLE, f"model {args.model!r} through {args.url}", rest=True)
    if not (live and ready):
        return _fail(EXIT_UNREACHABLE, f"{what} answers but is not ready (live={live}, ready={ready})")
    print(f"server {args.url}: live, ready (REST)")

    try:
        metadata = client.get_model_metadata(args.model, args.version, headers=headers)
    except InferenceServerException as exc:
        return _call_failed(exc, EXIT_MODEL, f"cannot read metadata of {args.model!r}", rest=True)
    if not client.is_model_ready(args.model, args.version, headers=headers):
        return _fail(EXIT_MODEL, f"model {args.model!r} version {args.version or 'latest'} is not ready (or unknown)")
    print(f"model {metadata['name']!r} versions {list(metadata.get('versions', []))} ready "
          f"({metadata.get('platform', '?')})")

    try:
        inputs = _make_inputs(args.model, metadata, args.rows, args.seed, httpclient)
    except ValueError as exc:
        return _fail(EXIT_INFER, str(exc))
    outputs = [httpclient.InferRequestedOutput(o["name"]) for o in metadata.get("outputs", [])] or None
    try:
        result = client.infer(args.model, inputs, model_version=args.version, outputs=outputs, headers=headers,
                              timeout=int(args.timeout * 1_000_000))
    except InferenceServerException as exc:
        return _fail(EXIT_INFER, f"inference failed ({exc.status()}): {exc.message()}")
    response = result.get_response()
    print(f"response from {response.get('model_name')!r} version {response.get('model_version') or '?'}:")
    _print_result(args.model, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
