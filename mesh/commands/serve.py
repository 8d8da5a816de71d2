"""``sluice serve``: run one model service over a model repository."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="serve the models of a repository over gRPC (KServe v2 / Triton protocol)",
        description="Serve every model in a repository <repo>/<model>/<version>/model.onnx. "
                    "Each flag can also be set as SLUICE_<FLAG> in the environment or in --config.",
    )
    parser.add_argument("--repo", type=Path, help="model repository folder (default ./models)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (default 8001; 0 = any free port)")
    parser.add_argument("--metrics-host", help="Prometheus listen address (default 127.0.0.1)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002; 0 = any; -1 = off)")
    parser.add_argument("--max-message-mb", type=int, help="largest gRPC message in MiB (default 64)")
    parser.add_argument("--grace-period", type=float, help="seconds to finish in-flight requests on SIGTERM")
    parser.add_argument("--drain-timeout", type=float, help="seconds a retired version gets to drain")
    parser.add_argument("--watch", action=argparse.BooleanOptionalAction,
                        help="load, replace and retire versions as repository files change (default on)")
    parser.add_argument("--watch-polling", action=argparse.BooleanOptionalAction,
                        help="poll the repository instead of inotify (network file systems)")
    parser.add_argument("--reload-quiet-ms", type=int,
                        help="load a version once its files were unchanged this long (default 300)")
    parser.add_argument("--load-threads", type=int, help="threads that load models (default 1)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    parser.add_argument("--config", type=Path, help="YAML file with any of these settings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mesh import logging as sluice_logging
    from services.server import ModelServer
    from services.settings import load_settings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    try:
        settings = load_settings(flags, args.config)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"sluice serve: invalid settings: {exc}")
        return 2
    sluice_logging.configure(settings.log_level, settings.log_format)
    asyncio.run(ModelServer(settings).serve())
    return 0
