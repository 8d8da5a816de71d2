"""What TLS and JWT on the gateway listener cost per request, next to a plain gateway, in one run.

Starts a throwaway etcd, one plain ``sluice serve`` (iris version 1) and three ``sluice gateway``
processes over the same registry: plain, TLS on the listener (``--tls-cert/--tls-key``), and TLS
plus JWT with per-model authorization (``--jwt-issuer/--jwt-audience/--jwt-jwks``,
``--access-claim``) as ``sluice up --secure`` configures the listener, the keys from a throwaway
development PKI (mesh/devstack/pki.py). The services stay plaintext here: this measures the front
door, not the upstream mTLS. Before measuring it checks that the secured gateway refuses a call
without a token and answers the benchmark bytes with one exactly as the direct call does. Then
h2load (one HTTP/2 connection, over TLS where the gateway has it; the token in ``authorization``)
runs c=1 and c=32 on every path in interleaved rounds; each cell is the median over the rounds,
the differences are paired by round.

    python -m bench.security [--duration 5] [--rounds 3] [--envoy-concurrency 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python bench/security.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np

from bench import loadgen
from bench.gateway_hop import (
    HEADERS,
    PREFIX,
    Target,
    bench_parser,
    gateway_argv,
    iris_repo,
    measure_rounds,
    register,
    require_h2load,
    serve_argv,
)
from bench.propagation import Admin, etcd_binary, start, tear_down, wait
from mesh.devstack import tokens
from mesh.devstack.pki import ensure_dev_pki, load_signing_key
from mesh.devstack.stack import etcd_argv
from mesh.ports import free_port
from mesh.registry.settings import EtcdSettings


def _secure_call(port: int, ca: Path, body: bytes, token: str | None) -> bytes | grpc.RpcError:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            loadgen.MODEL_INFER_PATH, request_serializer=None, response_deserializer=None)
        metadata: tuple[tuple[str, str | bytes], ...] = (
            ("x-model-name", "iris"), *((("authorization", f"Bearer {token}"),) if token else ()))
        try:
            answer: bytes = call(body, timeout=15, metadata=metadata)
            return answer
        except grpc.RpcError as exc:
            return exc


def render(direct: Target, targets: list[Target], args: argparse.Namespace) -> str:
    plain = targets[0]
    lines = [
        f"iris v1, batch 1, {args.rounds} rounds x {args.duration:g} s per point (median), "
        f"Envoy --concurrency {args.envoy_concurrency}, {os.cpu_count()} cores",
        "",
        "| path | c=1 p50 ms | c=1 p50 vs plain gateway (paired) | c=1 req/s | c=32 req/s | c=32 vs plain "
        "| c=32 p50 ms | CPU µs/req (c=1 / c=32) | CPU vs plain (c=1 / c=32) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in [direct, *targets]:
        lines.append(
            f"| {target.name} | {target.median(1, 'p50_ms'):.3f} | {target.paired(plain, 1, 'p50_ms'):+.3f} ms "
            f"| {target.median(1, 'rps'):,.0f} | {target.median(32, 'rps'):,.0f} "
            f"| {target.median(32, 'rps') / plain.median(32, 'rps'):.2f}x | {target.median(32, 'p50_ms'):.2f} "
            f"| {target.median(1, 'cpu_us'):.0f} / {target.median(32, 'cpu_us'):.0f} "
            f"| {target.paired(plain, 1, 'cpu_us'):+.0f} / {target.paired(plain, 32, 'cpu_us'):+.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = bench_parser(__doc__, duration=5.0).parse_args()
    require_h2load()

    workdir = Path(tempfile.mkdtemp(prefix="sluice-security-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pki = ensure_dev_pki(workdir / "pki")
        token = tokens.mint(load_signing_key(pki.jwt_key), subject="bench", models=["iris"])
        etcd_port, peer_port = free_port(), free_port()
        procs.append(start(etcd_argv(etcd_binary(), workdir / "etcd", etcd_port, peer_port, durable=False),
                           workdir / "etcd.log"))
        repo = iris_repo(workdir)
        service_port = free_port()
        procs.append(start(serve_argv(repo.parent, service_port, "--rest-port", "-1"), workdir / "serve.log"))
        tls = ["--tls-cert", str(pki.gateway.cert), "--tls-key", str(pki.gateway.key)]
        jwt = ["--jwt-issuer", tokens.ISSUER, "--jwt-audience", tokens.AUDIENCE, "--jwt-jwks", str(pki.jwks),
               "--access-claim", tokens.MODELS_CLAIM, "--admin-claim", tokens.ADMIN_CLAIM]
        bearer = (*HEADERS, f"authorization: Bearer {token}")
        gateways = [("gateway, plain", [], HEADERS, "http"), ("gateway, TLS", tls, HEADERS, "https"),
                    ("gateway, TLS + JWT + per-model RBAC", [*tls, *jwt], bearer, "https")]
        targets: list[Target] = []
        admins = []
        for index, (name, flags, headers, scheme) in enumerate(gateways):
            listen_port, admin_port = free_port(), free_port()
            procs.append(start(gateway_argv(etcd_port, listen_port, admin_port, workdir / f"xds-{index}",
                                            args.envoy_concurrency, *flags), workdir / f"gateway-{index}.log"))
            targets.append(Target(name, listen_port, headers=headers, scheme=scheme))
            admins.append(Admin(admin_port))
        for admin in admins:
            wait(lambda a=admin: a.get("/ready").strip() == b"LIVE", 60, "Envoy ready")
        settings = EtcdSettings(endpoints=[f"127.0.0.1:{etcd_port}"], prefix=PREFIX)
        asyncio.run(register(settings, f"127.0.0.1:{service_port}"))

        inputs = {"input": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)}
        body = loadgen.encode_request("iris", inputs)
        body_path = workdir / "iris.body.bin"
        body_path.write_bytes(loadgen.grpc_frame(body))
        direct = Target("direct (plaintext)", service_port)
        for target in (direct, targets[0]):
            error = loadgen.wait_until_serving(target.port, body, 60.0)
            if error:
                raise SystemExit(f"{target.name}: {error}")
        reference = loadgen.raw_call(direct.port, body, 15.0)
        if isinstance(reference, str):
            raise SystemExit(f"direct: {reference}")
        for target in [direct, *targets]:
            target.response_bytes = len(reference) + 5
        wait(lambda: _secure_call(targets[1].port, pki.ca.cert, body, None) == reference, 60, "TLS gateway routed")
        wait(lambda: _secure_call(targets[2].port, pki.ca.cert, body, token) == reference, 60,
             "TLS + JWT gateway routed")
        refused = _secure_call(targets[2].port, pki.ca.cert, body, None)
        if not isinstance(refused, grpc.RpcError) or refused.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise SystemExit(f"the JWT gateway answered a call without a token: {refused!r}")

        load_before = os.getloadavg()[0]
        measure_rounds([direct, *targets], body_path, args, workdir / "h2load")
        print(f"\nload average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
        print(render(direct, targets, args))
    finally:
        tear_down(procs, workdir, keep=args.keep)


if __name__ == "__main__":
    main()
