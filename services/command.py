"""``sluice serve``: run one model service over a model repository."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def register(subparsers: Any) -> None:
    from mesh.registry.command import etcd_flags

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", parents=[etcd_flags()],
        help="serve the models of a repository over gRPC (KServe v2 / Triton protocol)",
        description="Serve every model in a repository <repo>/<model>/<version>/model.onnx. "
                    "Each flag can also be set as SLUICE_<FLAG> in the environment or in --config.",
    )
    parser.add_argument("--repo", type=Path, help="model repository folder (default ./models)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (default 8001; 0 = any free port)")
    parser.add_argument("--metrics-host", help="Prometheus listen address (default 127.0.0.1)")
    parser.add_argument("--metrics-port", type=int,
                        help="Prometheus port (default --port + 1, so 8002; 0 = any; -1 = off)")
    parser.add_argument("--max-message-mb", type=int, help="largest gRPC message in MiB (default 64)")
    parser.add_argument("--max-concurrency", type=int,
                        help="requests handled at once (gRPC handler threads, default 128)")
    parser.add_argument("--max-streams", type=int,
                        help="ModelStreamInfer streams open at once (default half of --max-concurrency)")
    parser.add_argument("--stream-idle-timeout", type=float,
                        help="seconds a stream may idle before the server ends it (default 60)")
    parser.add_argument("--max-calls-per-connection", type=int,
                        help="calls one HTTP/2 connection may have open at once (default 100)")
    parser.add_argument("--handler-policy", choices=["batch", "normal"],
                        help="Linux scheduling policy of the handler threads (default batch: a waking "
                             "thread does not preempt a running one)")
    parser.add_argument("--grace-period", type=float, help="seconds to finish in-flight requests on SIGTERM")
    parser.add_argument("--drain-timeout", type=float, help="seconds a retired version gets to drain")
    parser.add_argument("--watch", action=argparse.BooleanOptionalAction,
                        help="load, replace and retire versions as repository files change (default on)")
    parser.add_argument("--watch-polling", action=argparse.BooleanOptionalAction,
                        help="poll the repository instead of inotify (network file systems)")
    parser.add_argument("--reload-quiet-ms", type=int,
                        help="load a version once its files were unchanged this long (default 300)")
    parser.add_argument("--load-threads", type=int, help="threads that load models (default 1)")
    parser.add_argument("--repository-control", action=argparse.BooleanOptionalAction,
                        help="allow RepositoryModelLoad/Unload from clients (an admin surface; default off)")
    parser.add_argument("--registry", action=argparse.BooleanOptionalAction,
                        help="register served versions in etcd (implied by --etcd)")
    parser.add_argument("--advertise-address", help="host:port the gateway uses for this process")
    parser.add_argument("--instance-id", help="unique name of this process in etcd (default <hostname>-<port>)")
    parser.add_argument("--deregister-grace", type=float,
                        help="seconds between leaving etcd and draining (gateway catch-up, default 2)")
    parser.add_argument("--lease-ttl", type=int, help="etcd lease TTL in seconds (default 10)")
    parser.add_argument("--otlp-endpoint", help="OTLP gRPC collector for traces (tracing is off without it)")
    parser.add_argument("--trace-sampling", type=float, help="share of new traces sampled (default 1.0)")
    parser.add_argument("--service-name", help="service.name on spans (default sluice-service)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-levels", help="per-component levels: services.batcher=debug,mesh=warning")
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    parser.add_argument("--config", type=Path, help="YAML file with any of these settings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mesh.observability import logging as sluice_logging
    from mesh.ports import PortBindError
    from mesh.registry.command import ETCD_FLAGS, settings_from_args
    from mesh.registry.settings import EtcdSettings
    from services.server import ModelServer
    from services.settings import load_settings

    skip = {"func", "command", "config", "lease_ttl", *ETCD_FLAGS}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    if args.endpoints is not None and flags.get("registry") is None:
        flags["registry"] = True
    try:
        settings = load_settings(flags, args.config)
        etcd = settings_from_args(args)
        if args.lease_ttl is not None:
            etcd = EtcdSettings.model_validate({**etcd.model_dump(), "lease_ttl": args.lease_ttl})
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"sluice serve: invalid settings: {exc}")
        return 2
    try:
        levels = sluice_logging.parse_levels(settings.log_levels)
    except ValueError as exc:
        print(f"sluice serve: invalid settings: {exc}")
        return 2
    sluice_logging.configure(settings.log_level, settings.log_format, levels)
    try:
        asyncio.run(ModelServer(settings, etcd).serve())
    except PortBindError as exc:
        print(f"sluice serve: {exc}", file=sys.stderr)
        return 2
    return 0
