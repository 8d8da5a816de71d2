"""``sluice mesh-sync``: keep Istio VirtualService weights in step with the routing documents in etcd.

Flags are generated from :class:`mesh.istio.settings.MeshSyncSettings` (env ``SLUICE_MESH_SYNC_…``)
and :class:`mesh.registry.settings.EtcdSettings` (env ``SLUICE_ETCD_…``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``sluice mesh-sync`` to the ``sluice`` parser."""
    from mesh.istio.settings import MeshSyncSettings
    from mesh.observability.component import add_settings_flags
    from mesh.registry.command import etcd_flags

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "mesh-sync", parents=[etcd_flags()],
        help="sync etcd routing weights into Istio VirtualServices (Kubernetes mesh mode)",
        description="Watch the routing documents in etcd and patch the weights of each model's Istio "
                    "VirtualService (guarded JSON patch: a concurrent edit is detected, never overwritten), "
                    "writing the outcome to models/<model>/status. Each flag can also be set as "
                    "SLUICE_MESH_SYNC_<FLAG> in the environment.",
    )
    add_settings_flags(parser, MeshSyncSettings)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the settings (flag > env > default), then sync until SIGTERM/SIGINT."""
    from pydantic import ValidationError

    from mesh.istio.settings import MeshSyncSettings
    from mesh.istio.sync import run_mesh_sync
    from mesh.observability.component import fail, given_flags, one_line, run_component
    from mesh.ports import PortBindError
    from mesh.registry.command import settings_from_args

    try:
        settings = MeshSyncSettings(**given_flags(args, MeshSyncSettings.model_fields))
        etcd = settings_from_args(args)
    except (ValidationError, ValueError) as exc:
        # stdout, as it always was for this command (scripts and tests read it there)
        return fail("mesh-sync", f"invalid settings: {one_line(exc)}", 2, file=sys.stdout)

    async def main(stop: asyncio.Event) -> None:
        await run_mesh_sync(settings, etcd, stop)

    return run_component("mesh-sync", main, log=settings, errors={PortBindError: 2})
