"""Watches the model repository and asks the manager to re-sync the models whose files changed.

The watcher is where the quiet interval (``--reload-quiet-ms``) is waited, once: a burst of
changes is handed on only after the tree was quiet that long.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from watchfiles import awatch

from services.manager import ModelManager

log = structlog.get_logger(__name__)


def affected_models(repo: Path, paths: set[str]) -> set[str]:
    """The model folder (first path part under ``repo``) of each changed path."""
    names: set[str] = set()
    root = repo.resolve()
    for raw in paths:
        try:
            relative = Path(raw).resolve().relative_to(root)
        except ValueError:
            continue
        if relative.parts and not relative.parts[0].startswith("."):
            names.add(relative.parts[0])
    return names


class RepositoryWatcher:
    """``awatch`` over the whole repository: new/removed model folders, versions, config.yaml."""

    def __init__(self, repo: Path, manager: ModelManager, reload_quiet_ms: int = 300,
                 force_polling: bool = False) -> None:
        self.repo = repo
        self.manager = manager
        self.reload_quiet_ms = reload_quiet_ms
        """Changes are handed on once the tree was unchanged this long (a copy is one burst)."""
        self.force_polling = force_polling
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="repository-watcher")

    async def _run(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        log.info("repository_watch_started", repo=str(self.repo), reload_quiet_ms=self.reload_quiet_ms,
                 polling=self.force_polling)
        while not self._stop.is_set():
            try:
                # Changes are yielded once the tree was quiet for `step` ms (or after 10 s of
                # continuous writing), so a copy in progress is seen as one burst.
                async for changes in awatch(self.repo, stop_event=self._stop, step=self.reload_quiet_ms,
                                            debounce=10_000, force_polling=self.force_polling,
                                            recursive=True):
                    for name in sorted(affected_models(self.repo, {path for _change, path in changes})):
                        log.debug("repository_changed", model=name)
                        self.manager.request_sync(name)
            except Exception:  # the watcher must outlive odd file systems and races
                log.exception("repository_watch_failed", restart_in_s=1.0)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except TimeoutError:
                self._task.cancel()
