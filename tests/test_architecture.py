"""The layers of docs/architecture.md, checked: every import in services/, gateway/ and mesh/ runs
downwards (or sideways inside one package), never up.

    mesh.protocol, mesh.errors, mesh.ports, mesh.tls_files   (the contract and shared basics)
      ← mesh.observability                   (logging, tracing, traces, running a component)
      ← mesh.registry                        (etcd: client, keys, records, state, registrar)
      ← mesh.control | mesh.rollout          (the controller loop; rollouts, read by services too)
      ← services | gateway | mesh.istio      (components: never import each other)
      ← mesh.devstack                        (`sluice up` starts the components)
      ← mesh.cli                             (the entry point dispatches to their commands)

Imports inside functions count as well: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("services", "gateway", "mesh")

# (package, layer): a module may import its own package and packages of a lower layer. Packages of
# one layer are siblings and may not import each other. Longest prefix wins.
LAYERS: dict[str, int] = {
    "protos": 0,
    "mesh.protocol": 0, "mesh.errors": 0, "mesh.ports": 0, "mesh.tls_files": 0,
    "mesh.observability": 1,
    "mesh.registry": 2,
    "mesh.control": 3, "mesh.rollout": 3,
    "services": 4, "gateway": 4, "mesh.istio": 4, "mesh.debug": 4,
    "mesh.devstack": 5,
    "mesh.cli": 6,
}
# Basics of one layer that may import one another (an error type next to the rule it reports).
SHARED = {"protos", "mesh.protocol", "mesh.errors", "mesh.ports", "mesh.tls_files"}


def package_of(module: str) -> str | None:
    """The entry of :data:`LAYERS` that ``module`` belongs to (None: outside sluice)."""
    best: str | None = None
    for package in LAYERS:
        if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best)):
            best = package
    if best is None and module.startswith("mesh."):
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS and docs/architecture.md")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``path``; ``from a import b`` yields ``a.b`` too,
    since ``b`` may be a module (``from mesh import protocol``)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None when the import runs with the layers."""
    source, target = package_of(importer), package_of(imported)
    if source is None or target is None or source == target:
        return None
    if LAYERS[target] > LAYERS[source]:
        return f"{source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]}): upwards"
    if LAYERS[target] == LAYERS[source] and not {source, target} <= SHARED:
        return f"{source} imports its sibling {target}: components never import each other"
    return None


def violations_in(path: Path, importer: str) -> list[str]:
    """One line per import in ``path`` (the module ``importer``) that runs against the layers."""
    problems: list[str] = []
    for line, imported in imports_of(path):
        why = violation(importer, imported)
        if why and f"{line}: {why}" not in problems:
            problems.append(f"{line}: {why}")
    return problems


def source_files() -> list[Path]:
    return sorted(path for folder in SOURCES for path in (ROOT / folder).rglob("*.py"))


def test_every_import_runs_with_the_layers() -> None:
    paths = source_files()
    assert len(paths) > 50, "the sources were not found"
    problems = [f"{path.relative_to(ROOT)}:{problem}" for path in paths
                for problem in violations_in(path, module_name(path))]
    assert problems == []


@pytest.mark.parametrize(("importer", "imported"), [
    ("services.server", "gateway.render"),
    ("gateway.controller", "services.catalog"),
    ("mesh.registry.state", "mesh.devstack.stack"),
    ("mesh.registry.registrar", "services.server"),
    ("mesh.observability.logging", "mesh.registry.settings"),
    ("mesh.istio.sync", "gateway.snapshot"),
    ("mesh.control.loop", "gateway.controller"),
    ("mesh.protocol", "mesh.registry.keys"),
])
def test_an_import_against_the_layers_is_found(importer: str, imported: str) -> None:
    assert violation(importer, imported) is not None


@pytest.mark.parametrize(("importer", "imported"), [
    ("services.server", "mesh.registry.settings"),
    ("gateway.controller", "mesh.control.loop"),
    ("mesh.devstack.stack", "services.settings"),
    ("mesh.cli", "gateway.command"),
    ("mesh.errors", "mesh.protocol"),
    ("mesh.registry.keys", "mesh.protocol"),
])
def test_an_import_with_the_layers_passes(importer: str, imported: str) -> None:
    assert violation(importer, imported) is None


def test_a_planted_upward_import_fails(tmp_path: Path) -> None:
    """A lazy import of `sluice up` from the registry, as a module of mesh.registry would hold it."""
    planted = tmp_path / "planted.py"
    planted.write_text("import json\n\n\ndef f() -> None:\n    from mesh.devstack import stack\n")
    assert violations_in(planted, "mesh.registry.planted") == [
        "5: mesh.registry (layer 2) imports mesh.devstack (layer 5): upwards"]
