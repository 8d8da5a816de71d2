"""Reading a model repository: ``<repo>/<model>/<version>/model.onnx`` (+ ``<repo>/<model>/config.yaml``).

Folder names become model names in etcd keys, Envoy clusters and headers, so a model folder must
follow :data:`mesh.protocol.MODEL_NAME_RULE`; one that does not is refused (for itself only) when
it is found. Nothing outside the repository is ever read: a model folder, version folder or file
that resolves elsewhere (a symbolic link out) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from mesh import protocol

log = structlog.get_logger(__name__)

MODEL_FILE: Final = "model.onnx"
READY_MARKER: Final = "READY"


def invalid_name_reason(folder: str) -> str:
    """Why a model folder called ``folder`` is not served (shown in RepositoryIndex)."""
    return f"folder '{protocol.clip(folder)}' is not a valid model name: use {protocol.MODEL_NAME_RULE}"


def outside_repository(repo: Path, path: Path) -> bool:
    """True when ``path`` (under ``repo``) resolves to somewhere outside ``repo`` through a
    symbolic link. A path that cannot be resolved counts as outside."""
    try:
        root = repo.resolve(strict=True)
        target = path.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop raises RuntimeError
        return True
    return not target.is_relative_to(root)


@dataclass(frozen=True, slots=True)
class VersionOnDisk:
    model: str
    version: int
    directory: Path

    @property
    def model_file(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def shown_file(self) -> str:
        """The model file relative to the repository: how it is named to clients."""
        return f"{self.model}/{self.version}/{MODEL_FILE}"

    @property
    def has_ready_marker(self) -> bool:
        return (self.directory / READY_MARKER).exists()


def parse_version(name: str) -> int | None:
    """A version folder is a positive integer without sign or leading zeros."""
    return protocol.parse_version_text(name)


@dataclass(frozen=True, slots=True)
class RepositoryScan:
    """What a scan found: the models (complete or not: the loader decides) and the folders
    refused for their name, folder name -> reason."""

    models: dict[str, dict[int, VersionOnDisk]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def model_folder_exists(repo: Path, name: str) -> bool:
    """``name`` is a valid model name with a folder in ``repo`` (no other file system access
    happens for an invalid name: it could be ``../elsewhere``)."""
    return protocol.is_model_name(name) and (repo / name).is_dir()


def scan_versions(repo: Path, name: str) -> dict[int, VersionOnDisk]:
    """The version folders of one (valid) model."""
    versions: dict[int, VersionOnDisk] = {}
    model_dir = repo / name
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return versions  # removed while we looked, or not a folder
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        version = parse_version(entry.name)
        if version is None:
            log.warning("version_folder_ignored", reason="not a positive integer", model=name,
                        folder=protocol.clip(entry.name), rule=protocol.VERSION_RULE)
            continue
        versions[version] = VersionOnDisk(name, version, model_dir / entry.name)
    return versions


def scan(repo: Path) -> RepositoryScan:
    """Models and their versions that exist on disk, and the model folders refused for their name."""
    found = RepositoryScan()
    if not repo.is_dir():
        return found
    for model_dir in sorted(repo.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        if not protocol.is_model_name(model_dir.name):
            found.refused[model_dir.name] = invalid_name_reason(model_dir.name)
            log.warning("model_folder_refused", reason="invalid model name", folder=protocol.clip(model_dir.name),
                        rule=protocol.MODEL_NAME_RULE)
            continue
        found.models[model_dir.name] = scan_versions(repo, model_dir.name)
    return found


def snapshot(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(relative path, size, mtime) of every file below ``directory``: equal snapshots mean the
    same files (a version that failed to load is tried again only once its snapshot changes)."""
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
