"""Watches the model repository and asks the manager to re-sync the models whose files changed."""

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

    def __init__(self, repo: Path, manager: ModelManager, quiet_ms: int = 300, force_polling: bool = False
                 ) -> None:
        self.repo = repo
        self.manager = manager
        self.quiet_ms = quiet_ms
        self.force_polling = force_polling
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="repository-watcher")

    async def _run(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        log.info("watching model repository", repo=str(self.repo), quiet_ms=self.quiet_ms,
                 polling=self.force_polling)
        while not self._stop.is_set():
            try:
                # Changes are yielded once the tree was quiet for `step` ms (or after 10 s of
                # continuous writing), so a copy in progress is seen as one burst.
                async for changes in awatch(self.repo, stop_event=self._stop, step=self.quiet_ms,
                                            debounce=10_000, force_polling=self.force_polling,
                                            recursive=True):
                    for name in sorted(affected_models(self.repo, {path for _change, path in changes})):
                        log.debug("repository changed", model=name)
                        self.manager.request_sync(name)
            except Exception:  # the watcher must outlive odd file systems and races
                log.exception("repository watcher failed; restarting in 1 s")
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except TimeoutError:
                self._task.cancel()
