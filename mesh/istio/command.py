"""``sluice mesh-sync``: keep Istio VirtualService weights in step with the routing documents in etcd."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

if TYPE_CHECKING:
    from mesh.istio.sync import MeshSyncSettings
    from mesh.registry.settings import EtcdSettings

MESH_SYNC_FLAGS = ("virtual_services", "namespace", "kubeconfig", "api_version", "resync_interval",
                   "debounce_ms", "max_conflict_retries", "metrics_host", "metrics_port", "log_level", "log_format")


def register(subparsers: Any) -> None:
    from mesh.registry.command import etcd_flags

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "mesh-sync", parents=[etcd_flags()],
        help="sync etcd routing weights into Istio VirtualServices (Kubernetes mesh mode)",
        description="Watch the routing documents in etcd and patch the weights of each model's Istio "
                    "VirtualService (guarded JSON patch: a concurrent edit is detected, never overwritten), "
                    "writing the outcome to models/<model>/status. Each flag can also be set as "
                    "SLUICE_MESH_SYNC_<FLAG> in the environment.",
    )
    parser.add_argument("--virtual-service", dest="virtual_services", action="append", metavar="MODEL=NAME",
                        help="the VirtualService of a model (repeat; env: comma-separated)")
    parser.add_argument("--namespace", help="namespace of the VirtualServices (default: the pod's own)")
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster service account)")
    parser.add_argument("--api-version", help="networking.istio.io version (default v1; v1beta1 for Istio < 1.22)")
    parser.add_argument("--resync-interval", type=float, help="seconds between full passes (default 30)")
    parser.add_argument("--debounce-ms", type=int, help="wait this long for more etcd changes (default 100)")
    parser.add_argument("--max-conflict-retries", type=int, help="re-plans after a concurrent edit (default 3)")
    parser.add_argument("--metrics-host", help="Prometheus listen address (default 0.0.0.0)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 9103; -1 = off)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mesh.istio.sync import MeshSyncSettings
    from mesh.observability import logging as sluice_logging
    from mesh.ports import PortBindError
    from mesh.registry.command import settings_from_args

    flags = {name: getattr(args, name) for name in MESH_SYNC_FLAGS if getattr(args, name, None) is not None}
    try:
        settings = MeshSyncSettings(**flags)
        etcd = settings_from_args(args)
    except (ValidationError, ValueError) as exc:
        print(f"sluice mesh-sync: invalid settings: {exc}")
        return 2
    sluice_logging.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(_serve(settings, etcd))
    except PortBindError as exc:
        print(f"sluice mesh-sync: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(settings: MeshSyncSettings, etcd: EtcdSettings) -> None:
    from mesh.istio.sync import run_mesh_sync

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run_mesh_sync(settings, etcd, stop)
