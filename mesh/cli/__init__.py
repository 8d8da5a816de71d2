"""The ``sluice`` command line: the entry point only, it dispatches to each component's command.

Each command module (``services.command``, ``gateway.command``, ``mesh.registry.command``,
``mesh.istio.command``, ``mesh.devstack.command``) exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
Flags map 1:1 to settings fields; the environment (``SLUICE_…``) fills in what flags leave unset.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

COMMAND_MODULES = (
    "services.command",
    "mesh.registry.command",
    "gateway.command",
    "mesh.devstack.command",
    "mesh.istio.command",
    "mesh.rollout.command",
    "mesh.debug.command",
)


def _absent(exc: ModuleNotFoundError, name: str) -> bool:
    """Whether ``exc`` says the command module itself (or its component's package) is missing.

    An image may ship only some components (the gateway image has no ``services/``): their
    commands are left out. A missing dependency *inside* a present module is a real error.
    """
    return exc.name is not None and (name == exc.name or name.startswith(exc.name + "."))


def build_parser() -> argparse.ArgumentParser:
    """The ``sluice`` parser with every command whose module this installation has."""
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
            if not _absent(exc, name):
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; its return value is the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = cast(Callable[[argparse.Namespace], int], args.func)
    try:
        code = func(args)
    except KeyboardInterrupt:
        return 130
    if code != 0 and getattr(func, "__module__", "") == "mesh.registry.command":
        _hint_local_stack(args)
    return code


def _hint_local_stack(args: argparse.Namespace) -> None:
    """After a failed registry command (``status``, ``models``, ``weights``): when its etcd does not
    answer but a local ``sluice up`` runs with another one, say how to reach that (the registry
    commands sit below ``mesh.devstack`` and cannot know about local stacks themselves)."""
    try:
        # Lazy, as the command modules: an image may ship neither.
        from mesh.devstack.runstate import hint_for_unreachable_etcd  # noqa: PLC0415
        from mesh.registry.command import settings_from_args  # noqa: PLC0415

        endpoints = settings_from_args(args).endpoints
    except (ImportError, ValueError):  # an image without the devstack, or settings already refused
        return
    hint = hint_for_unreachable_etcd(endpoints)
    if hint is not None:
        print(f"sluice: hint: {hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
