"""``sluice gateway``: run the controller (and, unless ``--envoy-admin`` is given, Envoy itself).

SIGTERM/SIGINT stop it; SIGHUP hot-restarts the Envoy it supervises. ``--write-bootstrap PATH``
writes what an external Envoy needs to start, then exits.

Flags are generated from :class:`gateway.settings.GatewaySettings` (env ``SLUICE_GATEWAY_…``) and,
for etcd, from :class:`mesh.registry.settings.EtcdSettings` (env ``SLUICE_ETCD_…``): one per field,
its docstring the help.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

# Imports inside functions keep `sluice --help` instant (the controller pulls in etcd, Envoy helpers).


def register(subparsers: Any) -> None:
    """Add ``sluice gateway`` to the ``sluice`` parser."""
    from gateway.settings import GatewaySettings  # noqa: PLC0415
    from mesh.observability.component import add_settings_flags  # noqa: PLC0415
    from mesh.registry.command import etcd_flags  # noqa: PLC0415

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", parents=[etcd_flags()],
        help="route gRPC traffic to model versions through Envoy, following etcd",
        description="Watch the registry in etcd, render Envoy's listener, clusters and routes, validate "
                    "them with Envoy, publish them atomically and confirm Envoy applied them. Starts and "
                    "supervises Envoy unless --envoy-admin points at one that runs already.",
    )
    g = parser.add_argument_group("gateway (env SLUICE_GATEWAY_<NAME>)")
    add_settings_flags(g, GatewaySettings)
    g.add_argument("--write-bootstrap", type=Path, metavar="PATH",
                   help="for an external Envoy: write its bootstrap to PATH (and a first snapshot into "
                        "--xds-dir if none is there), then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the settings (flag > env > default), then run the controller until SIGTERM/SIGINT."""
    from gateway.controller import GatewayController  # noqa: PLC0415
    from gateway.errors import GatewayError  # noqa: PLC0415
    from gateway.settings import GatewaySettings  # noqa: PLC0415
    from mesh.observability.component import fail, given_flags, one_line, run_component  # noqa: PLC0415
    from mesh.ports import PortBindError  # noqa: PLC0415
    from mesh.registry.command import settings_from_args  # noqa: PLC0415

    try:
        settings = GatewaySettings(**given_flags(args, GatewaySettings.model_fields))
        etcd_settings = settings_from_args(args)
    except ValidationError as exc:
        return fail("gateway", f"invalid settings: {one_line(exc)}", 2)

    async def main(stop: asyncio.Event) -> None:
        controller = GatewayController(settings, etcd_settings)
        if args.write_bootstrap is not None:
            await controller.write_bootstrap(args.write_bootstrap)
            print(args.write_bootstrap)
            return
        restarts: set[asyncio.Task[None]] = set()

        def hot_restart() -> None:
            task = asyncio.create_task(controller.hot_restart_envoy())
            restarts.add(task)
            task.add_done_callback(restarts.discard)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hot_restart)
        await controller.run(stop)

    return run_component("gateway", main, log=settings, log_levels=settings.log_levels,
                         errors={PortBindError: 2, GatewayError: 1})
