"""``sluice serve``: run one model service over a model repository.

Every flag is a field of :class:`services.settings.ServiceSettings` (or, for etcd, of
:class:`mesh.registry.settings.EtcdSettings`), generated from it: the help is the field's docstring.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

# Imports inside functions keep `sluice --help` instant (the server pulls in ONNX Runtime and gRPC).


def register(subparsers: Any) -> None:
    """Add ``sluice serve`` to the ``sluice`` parser."""
    from mesh.observability.component import add_settings_flags
    from mesh.registry.command import etcd_flags
    from mesh.registry.settings import EtcdSettings
    from services.settings import ServiceSettings

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", parents=[etcd_flags()],
        help="serve the models of a repository over gRPC (KServe v2 / Triton protocol)",
        description="Serve every model in a repository <repo>/<model>/<version>/model.onnx. "
                    "Each flag can also be set as SLUICE_<FLAG> in the environment or in --config.",
    )
    add_settings_flags(parser, ServiceSettings)
    add_settings_flags(parser, EtcdSettings, fields=["lease_ttl"])
    parser.add_argument("--config", type=Path, help="YAML file with any of these settings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the settings (flag > env > --config > default), then serve until SIGTERM/SIGINT."""
    from pydantic import ValidationError

    from mesh.observability.component import fail, given_flags, one_line, run_component
    from mesh.ports import PortBindError
    from mesh.registry.command import settings_from_args
    from mesh.tls_files import TlsFileError
    from services.heap import fix_mmap_threshold, limit_arenas
    from services.server import ModelServer
    from services.settings import ServiceSettings, load_settings

    flags = given_flags(args, ServiceSettings.model_fields)
    if args.endpoints is not None and "register_in_etcd" not in flags:
        flags["register_in_etcd"] = True  # --etcd alone means: register there
    try:
        settings = load_settings(flags, args.config)
        etcd = settings_from_args(args)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        return fail("serve", f"invalid settings: {one_line(exc)}", 2)
    limit_arenas(settings.malloc_arenas)  # before any thread allocates
    fix_mmap_threshold(settings.malloc_mmap_threshold)

    async def serve(stop: asyncio.Event) -> None:
        server = ModelServer(settings, etcd)
        stopper = asyncio.create_task(stop.wait())
        stopper.add_done_callback(lambda _: server.request_stop())
        try:
            await server.serve()
        finally:
            stopper.cancel()

    return run_component("serve", serve, log=settings, log_levels=settings.log_levels,
                         errors={PortBindError: 2, TlsFileError: 2})
