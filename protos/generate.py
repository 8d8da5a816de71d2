"""Regenerate the Python code for every ``.proto`` file under ``protos/``.

Usage (from the repository root)::

    python -m protos.generate           # rewrite the generated files in place
    python -m protos.generate --check   # exit 1 if the committed files are stale

For each ``protos/**/NAME.proto`` this produces, next to it, ``NAME_pb2.py`` and
``NAME_pb2.pyi``, plus ``NAME_pb2_grpc.py`` when the file declares a service; and one
descriptor set of the gRPC service with every import (:data:`DESCRIPTOR_SET`, what Envoy's
``grpc_field_extraction`` reads to route on ``model_name`` in the request body). The
include root (``-I``) is the repository root, so generated imports read
``from protos.inference import model_config_pb2``.

One post-processing step is applied to each ``*_pb2.py`` (see ``use_private_pool``):
the descriptor is added to the private pool in ``<package>/_pool.py`` instead of
protobuf's default pool. tritonclient registers the same ``inference.*`` symbols in
the default pool, and protobuf refuses duplicate symbols, so without this rewrite
our modules and tritonclient could not be imported into the same process.

The output depends only on the ``.proto`` files and the installed grpcio-tools
version; ``--check`` regenerates into a temporary directory and compares bytes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOS_DIR = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
POOL_MODULE = "_pool"
SERVICE_PROTO = Path("protos/inference/grpc_service.proto")
DESCRIPTOR_SET = Path("protos/inference/grpc_service.descriptor.pb")
"""``protoc --include_imports --descriptor_set_out`` of :data:`SERVICE_PROTO` (repo-relative)."""

# The line protoc emits to register a file in the default pool, and its replacement.
_DEFAULT_POOL_CALL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_CALL = "DESCRIPTOR = _private_pool.POOL.AddSerializedFile("
# protoc's marker for the end of the import block; the pool import goes right after it.
_IMPORTS_MARKER = "# @@protoc_insertion_point(imports)\n"
_SERVICE_RE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)


class GenerationError(RuntimeError):
    """protoc failed, or its output no longer looks the way the post-processing expects."""


def find_protos() -> list[Path]:
    """All .proto files under protos/, relative to the repository root, in a stable order."""
    return sorted(p.relative_to(REPO_ROOT) for p in PROTOS_DIR.rglob("*.proto"))


def _declares_service(proto: Path) -> bool:
    return bool(_SERVICE_RE.search((REPO_ROOT / proto).read_text(encoding="utf-8")))


def _protoc(args: list[str]) -> None:
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    argv = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        raise GenerationError(f"protoc failed: {' '.join(argv)}")


def use_private_pool(source: str, proto: Path) -> str:
    """Make a generated ``*_pb2.py`` register into ``<package>._pool.POOL``.

    Two textual edits: import the pool module after protoc's import block, and
    swap ``_descriptor_pool.Default()`` for it. Both anchors must occur exactly
    once, so a change in protoc's output format fails loudly instead of silently
    falling back to the default pool.
    """
    pool_file = REPO_ROOT / proto.parent / f"{POOL_MODULE}.py"
    if not pool_file.is_file():
        raise GenerationError(f"{pool_file.relative_to(REPO_ROOT)} is missing (it defines POOL)")
    for anchor in (_DEFAULT_POOL_CALL, _IMPORTS_MARKER):
        if source.count(anchor) != 1:
            raise GenerationError(f"unexpected protoc output for {proto}: {anchor!r} not found exactly once")
    package = ".".join(proto.parent.parts)
    pool_import = f"from {package} import {POOL_MODULE} as _private_pool  # added by protos/generate.py\n"
    source = source.replace(_IMPORTS_MARKER, _IMPORTS_MARKER + pool_import)
    return source.replace(_DEFAULT_POOL_CALL, _PRIVATE_POOL_CALL)


def generate_into(out_dir: Path) -> dict[Path, bytes]:
    """Generate code for all protos into ``out_dir``; return {repo-relative path: content}."""
    protos = find_protos()
    if not protos:
        raise GenerationError(f"no .proto files under {PROTOS_DIR}")
    _protoc([f"--python_out={out_dir}", f"--pyi_out={out_dir}", *map(str, protos)])
    services = [str(p) for p in protos if _declares_service(p)]
    if services:
        _protoc([f"--grpc_python_out={out_dir}", *services])

    outputs: dict[Path, bytes] = {}
    for proto in protos:
        stem = proto.with_suffix("")
        for suffix in GENERATED_SUFFIXES:
            rel = stem.with_name(stem.name + suffix)
            produced = out_dir / rel
            if not produced.exists():
                continue  # no _pb2_grpc.py for service-less files
            content = produced.read_bytes()
            if suffix == "_pb2.py":
                content = use_private_pool(content.decode("utf-8"), proto).encode("utf-8")
            outputs[rel] = content
    descriptor = out_dir / DESCRIPTOR_SET
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    _protoc(["--include_imports", f"--descriptor_set_out={descriptor}", str(SERVICE_PROTO)])
    outputs[DESCRIPTOR_SET] = descriptor.read_bytes()
    return outputs


def committed_files() -> set[Path]:
    """Generated-looking files currently present under protos/."""
    found: set[Path] = set()
    for suffix in GENERATED_SUFFIXES:
        found.update(p.relative_to(REPO_ROOT) for p in PROTOS_DIR.rglob(f"*{suffix}"))
    if (REPO_ROOT / DESCRIPTOR_SET).exists():
        found.add(DESCRIPTOR_SET)
    return found


def diff(expected: dict[Path, bytes]) -> list[str]:
    """Human-readable list of files that differ from ``expected``; empty when up to date."""
    problems = []
    for rel in sorted(expected.keys() | committed_files()):
        path = REPO_ROOT / rel
        if rel not in expected:
            problems.append(f"  stale (no longer generated): {rel}")
        elif not path.exists():
            problems.append(f"  missing: {rel}")
        elif path.read_bytes() != expected[rel]:
            problems.append(f"  out of date: {rel}")
    return problems


def _tool_versions() -> str:
    versions = []
    for dist in ("grpcio-tools", "protobuf"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    return ", ".join(versions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protos.generate", description="Regenerate Python code for protos/**/*.proto."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write anything; exit 1 if the committed generated files differ",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="protos-generate-") as tmp:
        try:
            expected = generate_into(Path(tmp))
        except GenerationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

        problems = diff(expected)
        if args.check:
            if problems:
                print(
                    "Generated protobuf code is out of date with the .proto files:\n"
                    + "\n".join(problems)
                    + f"\nRegenerate with `python -m protos.generate` (using {_tool_versions()}).",
                    file=sys.stderr,
                )
                return 1
            print(f"protos: {len(expected)} generated files up to date.")
            return 0

        for rel in sorted(committed_files() - expected.keys()):
            (REPO_ROOT / rel).unlink()
            print(f"removed {rel}")
        for rel, content in sorted(expected.items()):
            target = REPO_ROOT / rel
            if target.exists() and target.read_bytes() == content:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            print(f"wrote {rel}")
        if not problems:
            print(f"protos: {len(expected)} generated files already up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
