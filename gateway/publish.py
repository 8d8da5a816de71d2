"""Atomic publication into a ``watched_directory``, in the layout of a Kubernetes ConfigMap volume::

    xds/..2026_01_01_12_00_00.123456789/   one directory per published snapshot
    xds/..data -> ..2026_...               swapped atomically with rename(2)
    xds/lds.yaml -> ..data/lds.yaml        stable names Envoy's config points at

Envoy reloads file xDS only when something is *moved* into a watched directory; renaming a new
``..data`` link over the old one is that move, and every file changes at the same instant.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Collection
from pathlib import Path

import yaml

from gateway.errors import PublishError

DATA_LINK = "..data"
_KEEP_DIRS = 2


class Publisher:
    """Writes snapshots' files into ``directory`` and swaps them in atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.absolute()

    def current_files(self) -> set[str]:
        """The file names of the live data directory (empty if nothing was published yet)."""
        data = self.directory / DATA_LINK
        return {p.name for p in data.iterdir()} if data.is_dir() else set()

    def has_data(self) -> bool:
        return (self.directory / DATA_LINK / "lds.yaml").is_file()

    def publish(self, files: dict[str, bytes], private: Collection[str] = ()) -> Path:
        """Write ``files`` into a new data directory and make it live; returns that directory.

        The files named in ``private`` (secrets with private keys) are readable by their owner only.
        Blocking: run it in an executor.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
            data_dir = self.directory / f"..{stamp}"
            data_dir.mkdir()
            for name, content in files.items():
                _write_file(data_dir / name, content, 0o600 if name in private else 0o644)
            for name in files:
                # A link for a new file may dangle until the swap: nothing points Envoy at it before.
                link = self.directory / name
                if not link.is_symlink():
                    if link.exists():
                        raise PublishError(f"{link} exists and is not a link into {DATA_LINK}")
                    link.symlink_to(f"{DATA_LINK}/{name}")
            tmp_link = self.directory / f"{DATA_LINK}_tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            tmp_link.symlink_to(data_dir.name)
            os.replace(tmp_link, self.directory / DATA_LINK)
        except OSError as exc:
            raise PublishError(f"cannot publish into {self.directory}: {exc}") from exc
        return data_dir

    def cleanup(self) -> None:
        """Drop links to files the live snapshot lacks and all but the newest data directories.

        Called once Envoy confirmed the live snapshot, so nothing still reads the old files.
        """
        live = self.current_files()
        if not live:
            return
        for entry in self.directory.iterdir():
            if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in live:
                with contextlib.suppress(OSError):
                    entry.unlink()
        current = os.readlink(self.directory / DATA_LINK)
        data_dirs = sorted(p for p in self.directory.iterdir()
                           if p.name.startswith("..") and p.is_dir() and not p.is_symlink())
        for old in data_dirs[:-_KEEP_DIRS]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)


def _write_file(path: Path, content: bytes, mode: int) -> None:
    """A new file whose mode is ``mode`` from its first byte (a key is never briefly world-readable)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(content)


def load_published(directory: Path) -> dict[str, dict[str, object]]:
    """The documents of the live data directory: file name → parsed YAML (empty if none).

    Lets a restarted controller know what Envoy serves before it publishes anything.
    """
    data = directory / DATA_LINK
    documents: dict[str, dict[str, object]] = {}
    if not data.is_dir():
        return documents
    for path in sorted(data.iterdir()):
        try:
            loaded = yaml.safe_load(path.read_bytes())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(loaded, dict):
            documents[path.name] = loaded
    return documents
