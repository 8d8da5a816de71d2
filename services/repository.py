"""Reading a model repository: ``<repo>/<model>/<version>/model.onnx`` (+ ``<repo>/<model>/config.yaml``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.model import MODEL_FILE

log = structlog.get_logger(__name__)

READY_MARKER = "READY"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class VersionOnDisk:
    model: str
    version: int
    directory: Path

    @property
    def model_file(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def has_ready_marker(self) -> bool:
        return (self.directory / READY_MARKER).exists()


def parse_version(name: str) -> int | None:
    """A version folder is a positive integer without sign or leading zeros."""
    if not (name.isascii() and name.isdigit()) or name.startswith("0"):
        return None
    return int(name)


def scan(repo: Path) -> dict[str, dict[int, VersionOnDisk]]:
    """Models and their versions that exist on disk (complete or not: the loader decides)."""
    models: dict[str, dict[int, VersionOnDisk]] = {}
    if not repo.is_dir():
        return models
    for model_dir in sorted(repo.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        if not MODEL_NAME.match(model_dir.name):
            log.warning("ignoring folder with an invalid model name", path=str(model_dir))
            continue
        versions: dict[int, VersionOnDisk] = {}
        for version_dir in model_dir.iterdir():
            if not version_dir.is_dir() or version_dir.name.startswith("."):
                continue
            version = parse_version(version_dir.name)
            if version is None:
                log.warning("ignoring version folder that is not a positive integer", path=str(version_dir))
                continue
            versions[version] = VersionOnDisk(model_dir.name, version, version_dir)
        models[model_dir.name] = versions
    return models


def snapshot(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(relative path, size, mtime) of every file below ``directory``: equal snapshots taken a
    quiet interval apart mean nobody is writing there."""
    entries: list[tuple[str, int, int]] = []
    if not directory.exists():
        return ()
    for path in sorted(directory.rglob("*")):
        try:
            stat = path.stat()
        except OSError:
            continue  # removed while we looked
        entries.append((str(path.relative_to(directory)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)
