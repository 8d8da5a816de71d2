"""The ``sluice`` command line: one sub-command per module in :mod:`mesh.commands`.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit code). Flags map 1:1
to settings fields; the environment (``SLUICE_…``) fills in what flags leave unset.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

COMMAND_MODULES = (
    "mesh.commands.serve",
    "mesh.commands.registry",
    "gateway.command",
    "mesh.commands.up",
    "mesh.commands.mesh_sync",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="ONNX model serving as gRPC microservices behind an Envoy gateway.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command module that does not exist yet in this build
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = cast(Callable[[argparse.Namespace], int], args.func)
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
