"""The load pipeline: repository → ONNX Runtime session → checks → warm-up → publish; and retire.

Loads run on a small dedicated executor so they never starve serving. A version is published only
after it loaded, passed its signature check and warmed up; a replaced or retired version stops
taking new requests at once, finishes what it accepted, and only then releases its session. Any
failure leaves what was serving untouched and is recorded; transient failures are retried with
backoff, the others when the files change again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from mesh import protocol
from services import repository
from services.catalog import ModelCatalog, VersionState
from services.config import ModelConfig, load_model_config
from services.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, PermissionDeniedError
from services.metrics import ServiceMetrics
from services.model import OnnxModel, fingerprint, signature_conflicts, without_paths
from services.repository import VersionOnDisk, outside_repository, scan, scan_versions, snapshot
from services.served import ServedVersion

log = structlog.get_logger(__name__)

ReadyHook = Callable[[ServedVersion], Awaitable[None]]
RetireHook = Callable[[str, int], Awaitable[None]]
FailedHook = Callable[[str, int, str], Awaitable[None]]
"""Model, version and reason of a load that failed with no copy of the version serving."""
ReloadHook = Callable[[str, int, str | None], Awaitable[None]]
"""Model, version and reason of a reload that failed while the older copy of the version keeps
serving; None once that copy is in line with the files again (a good reload, the files restored)."""
LoadCheck = Callable[[OnnxModel], None]
"""Raises ModelLoadError when a loaded version must not be published (e.g. its etcd record would
be too large); runs on the loop, so it must be cheap."""
CONTROL_SETTING = "--repository-control (SLUICE_REPOSITORY_CONTROL=true)"

_T = TypeVar("_T")
_RETRY_FIRST = 1.0
_RETRY_MAX = 60.0
_RELOAD_FAILED = "reload failed: "


@dataclass(slots=True)
class _LoadAttempts:
    """What the manager remembers of one version's loads (event loop only)."""

    failed_files: tuple[object, ModelConfig] | None = None
    """The files and config of the last failed load: tried again only once they change (or when
    the failure was transient and the retry timer fired)."""
    retries: int = 0
    """Retries scheduled in a row for a transient failure (the backoff exponent)."""
    retry: asyncio.TimerHandle | None = None
    """The pending retry after a transient failure (kept until cancelled, also once it fired)."""
    retry_due: bool = False
    """The retry timer fired: load again even though the files did not change."""


@dataclass(slots=True)
class _ModelSync:
    """What the manager keeps per model folder (event loop only)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One sync, explicit load or unload of the model at a time."""
    held: bool = False
    """Explicitly unloaded: file changes leave it alone until an explicit load."""
    sync: asyncio.Task[None] | None = None
    """The scheduled sync (watcher, retries), if one is running."""
    dirty: bool = False
    """Asked again while ``sync`` ran: it runs once more."""
    versions: dict[int, _LoadAttempts] = field(default_factory=dict)


def _release_memory() -> None:
    """Hand freed heap pages back to the OS after a session is dropped (glibc keeps them otherwise)."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


class ModelManager:
    def __init__(self, repo: Path, catalog: ModelCatalog, metrics: ServiceMetrics, *,
                 load_threads: int = 1, drain_timeout: float = 30.0,
                 retire_delay: float = 0.0, repository_control: bool = False) -> None:
        self.repo = repo
        self.catalog = catalog
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self.retire_delay = retire_delay
        """Seconds between deregistering a version and draining it (gateway catch-up time)."""
        self.repository_control = repository_control
        """Whether clients may load and unload models explicitly (an admin surface, off by default)."""
        self.on_ready: list[ReadyHook] = []
        self.on_retire: list[RetireHook] = []
        self.on_failed: list[FailedHook] = []
        """Called when a version fails to load and serves nothing; the on_retire hooks follow when
        the failed version is deleted from the repository."""
        self.on_reload_failed: list[ReloadHook] = []
        """Called when a reload fails while the older copy serves on, and with None when the files
        are back to that copy's (a good reload calls the on_ready hooks instead)."""
        self.load_checks: list[LoadCheck] = []
        self._executor = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="model-load")
        self._models: dict[str, _ModelSync] = {}
        """Per model folder the manager was asked about: its sync state (loop only)."""
        self._closed = False

    def _model(self, name: str) -> _ModelSync:
        entry = self._models.get(name)
        if entry is None:
            entry = self._models[name] = _ModelSync()
        return entry

    def _attempts(self, name: str, version: int) -> _LoadAttempts:
        model = self._model(name)
        entry = model.versions.get(version)
        if entry is None:
            entry = model.versions[version] = _LoadAttempts()
        return entry

    async def _off_loop(self, func: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    # -- entry points ---------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every model in the repository, versions chosen by each model's policy."""
        found = await self._off_loop(scan, self.repo)
        for folder, reason in found.refused.items():
            self.catalog.set_model_error(protocol.clip(folder), reason)
        if not found.models:
            log.warning("repository_empty", repo=str(self.repo))
        await asyncio.gather(*(self._sync_guarded(name) for name in found.models))

    async def _sync_guarded(self, name: str) -> None:
        """:meth:`sync_model`, with whatever escapes it kept to this model (logged, shown as its error)."""
        try:
            await self.sync_model(name)
        except Exception as exc:
            log.exception("model_sync_failed", model=name)
            self.catalog.set_model_error(name, f"internal error while reading the model: {type(exc).__name__}")

    def request_sync(self, name: str) -> None:
        """Schedule a sync of ``name`` (watcher, retries); bursts coalesce into one more run."""
        known = self._models.get(name)
        if self._closed or (known is not None and known.held):
            return
        model = known or self._model(name)
        if model.sync is not None and not model.sync.done():
            model.dirty = True
            return

        async def run() -> None:
            while True:
                model.dirty = False
                await self._sync_guarded(name)  # never lets one model's failure stop the watcher
                if not model.dirty or self._closed:
                    return

        model.sync = asyncio.create_task(run(), name=f"sync-{name}")

    def check_control(self, rpc: str, name: str) -> None:
        """Refuse an explicit load/unload unless enabled, and a name that breaks the model-name
        rule before it gets near the file system (``../elsewhere``, ``/abs``, 300 bytes)."""
        if not self.repository_control:
            raise PermissionDeniedError(f"{rpc} is disabled on this service; start it with {CONTROL_SETTING} "
                                        "to allow explicit model loading and unloading")
        if not protocol.is_model_name(name):
            raise InvalidRequestError(f"model name '{protocol.clip(name)}' is invalid: use {protocol.MODEL_NAME_RULE}")

    async def load_model(self, name: str) -> None:
        """Explicit load (RepositoryModelLoad): also lifts an explicit unload."""
        self.check_control("RepositoryModelLoad", name)
        # Nothing is recorded for a model that is not in the repository: unknown names must not
        # accumulate state (or log lines) however many a client sends.
        if not await self._off_loop(repository.model_folder_exists, self.repo, name):
            raise ModelNotFoundError(f"model '{name}' is not in the model repository")
        self._model(name).held = False
        await self.sync_model(name)

    async def unload_model(self, name: str) -> None:
        """Explicit unload (RepositoryModelUnload): stays unloaded until loaded explicitly."""
        self.check_control("RepositoryModelUnload", name)
        if name not in self.catalog.model_names():
            raise ModelNotFoundError(f"unknown model '{name}'")
        model = self._model(name)
        model.held = True
        async with model.lock:
            for version in self.catalog.ready_versions(name):
                await self._retire(name, version, "unloaded on request")

    # -- the sync ---------------------------------------------------------------------------------
    async def sync_model(self, name: str) -> None:
        """Bring what is served for ``name`` in line with the disk and its version policy.

        Called once the files settled: the repository watcher waits the quiet interval
        (``--reload-quiet-ms``) before it asks, so nothing here waits again."""
        if not protocol.is_model_name(name):
            await self._refuse_folder(name)
            return
        model = self._model(name)
        async with model.lock:
            try:
                if await self._off_loop(outside_repository, self.repo, self.repo / name):
                    raise ModelLoadError(f"{name}: the model folder resolves outside the model repository "
                                         "(a symbolic link?); sluice reads only files inside it")
                on_disk = await self._off_loop(scan_versions, self.repo, name)  # listed once known inside
                config = await self._off_loop(load_model_config, self.repo / name)
            except ModelLoadError as exc:
                # Keep serving what is loaded with the config it was loaded with.
                log.error("model_config_rejected", model=name, reason=str(exc))
                self.catalog.set_model_error(name, str(exc))
                return
            self.catalog.set_model_error(name, None)
            eligible = {v: d for v, d in on_disk.items()
                        if not config.require_ready_marker or d.has_ready_marker}
            wanted = config.version_policy.select([v for v, d in eligible.items() if d.model_file.is_file()])
            served = self.catalog.served().get(name, {})
            for version in wanted:
                current = served.get(version)
                if current is None or await self._changed(current, eligible[version], config):
                    where = eligible[version]
                    files = await self._off_loop(snapshot, where.directory)
                    attempts = self._attempts(name, version)
                    if attempts.failed_files == (files, config) and not attempts.retry_due:
                        continue  # same broken files as last time: wait for a change
                    attempts.retry_due = False
                    attempts.failed_files = None if await self._load(where, config, current) else (files, config)
            for version in list(self.catalog.ready_versions(name)):
                if version not in wanted:
                    reason = "deleted from the repository" if version not in on_disk else "left the version policy"
                    await self._retire(name, version, reason)
            for version in [v for v, a in model.versions.items() if a.retry is not None and v not in wanted]:
                self._cancel_retry(name, version)
            for status in [s for s in self.catalog.index() if s.model == name and s.version
                           and s.version not in on_disk and s.state is not VersionState.READY]:
                self.catalog.forget(name, status.version)  # failed versions that were deleted
                for hook in self.on_retire:
                    await hook(name, status.version)
            if not on_disk and not self.catalog.ready_versions(name):
                log.warning("model_has_no_versions", model=name)

    async def _refuse_folder(self, folder: str) -> None:
        """A model folder whose name breaks the rule (found by the watcher): shown in
        RepositoryIndex while it exists, never loaded."""
        shown = protocol.clip(folder)
        if await self._off_loop((self.repo / folder).is_dir):
            log.warning("model_folder_refused", reason="invalid model name", folder=shown,
                        rule=protocol.MODEL_NAME_RULE)
            self.catalog.set_model_error(shown, repository.invalid_name_reason(folder))
        else:
            self.catalog.set_model_error(shown, None)

    async def _changed(self, current: ServedVersion, where: VersionOnDisk, config: ModelConfig) -> bool:
        if current.model.config != config:
            return True
        try:
            return fingerprint(where.model_file) != current.model.fingerprint
        except OSError:
            return False  # vanished: the retire pass handles it

    async def _load(self, where: VersionOnDisk, config: ModelConfig, current: ServedVersion | None) -> bool:
        """Load, check, warm up and publish one version; False when it failed (already recorded)."""
        name, version = where.model, where.version
        if current is None:
            self.catalog.set_status(name, version, VersionState.LOADING)
        started = time.perf_counter()
        log.info("model_version_loading", model=name, version=version, path=str(where.model_file),
                 replacing=current is not None)

        def build() -> OnnxModel:
            if outside_repository(self.repo, where.model_file):
                raise ModelLoadError(f"{where.shown_file}: resolves outside the model repository (a symbolic "
                                     "link in the version folder or file?); sluice reads only files inside it")
            try:
                model = OnnxModel(name, version, where.model_file, config)
                model.warm_up()
            except ModelLoadError:
                raise
            except Exception as exc:  # whatever goes wrong in a load must only fail this load
                detail = without_paths(str(exc).strip(), where.model_file, where.shown_file)[:500]
                raise ModelLoadError(f"{where.shown_file}: {type(exc).__name__}: {detail}") from exc
            return model

        try:
            model = await self._off_loop(build)
            if current is not None and model.sha256 == current.model.sha256 and current.model.config == config:
                current.model.fingerprint = model.fingerprint  # touched, not changed
                model.close()
                await self._reload_recovered(name, version)
                return True
            try:
                for check in self.load_checks:
                    check(model)
                self._check_signature(model, current)
            except ModelLoadError:
                model.close()
                raise
        except ModelLoadError as exc:
            self._failed(name, version, exc, serving=current is not None)
            for failed_hook in self.on_failed if current is None else self.on_reload_failed:
                await failed_hook(name, version, str(exc))
            return False
        self._cancel_retry(name, version)
        served = ServedVersion.start(model, self.metrics.for_version(name, version), self.catalog.arrivals)
        previous = self.catalog.publish(served)
        seconds = time.perf_counter() - started
        self.metrics.loads.labels(name, "ok").inc()
        self.metrics.load_seconds.labels(name).observe(seconds)
        self.metrics.loaded.labels(name).set(len(self.catalog.ready_versions(name)))
        log.info("model_version_ready", model=name, version=version, seconds=round(seconds, 3),
                 max_batch_size=model.max_batch_size, providers=list(model.providers), sha256=model.sha256,
                 replaced=previous is not None)
        for hook in self.on_ready:
            await hook(served)
        if previous is not None:
            await self._drain(previous, "replaced by a new copy")
        return True

    async def _reload_recovered(self, name: str, version: int) -> None:
        """The files are back to those of the copy serving: its reload failure is over."""
        status = self.catalog.status(name, version)
        if status is None or not status.reason.startswith(_RELOAD_FAILED):
            return
        self.catalog.set_status(name, version, VersionState.READY)
        log.info("model_version_reload_recovered", model=name, version=version)
        for hook in self.on_reload_failed:
            await hook(name, version, None)

    def _check_signature(self, model: OnnxModel, current: ServedVersion | None) -> None:
        """Compare with the copy being replaced, or else with the newest version served."""
        reference = current
        if reference is None:
            older = [v for v in self.catalog.ready_versions(model.name) if v < model.version]
            if older:
                reference = self.catalog.served()[model.name][max(older)]
        if reference is None:
            return
        problems = signature_conflicts(reference.model, model)
        if not problems:
            return
        summary = f"incompatible with version {reference.version}: {'; '.join(problems)}"
        if model.config.on_signature_change == "refuse":
            raise ModelLoadError(f"{model.where}: {summary} (set on_signature_change: warn to allow)")
        log.warning("model_signature_changed", model=model.name, version=model.version, problems=problems)

    def _failed(self, name: str, version: int, exc: ModelLoadError, *, serving: bool) -> None:
        reason = str(exc)
        self.metrics.loads.labels(name, "failed").inc()
        if serving:
            # The copy that was serving keeps serving; the failure is reported next to it.
            self.catalog.set_status(name, version, VersionState.READY, f"{_RELOAD_FAILED}{reason}")
        else:
            self.catalog.set_status(name, version, VersionState.UNAVAILABLE, reason)
        log.error("model_version_load_failed", model=name, version=version, reason=reason,
                  transient=exc.transient, still_serving_previous=serving)
        if exc.transient:
            self._schedule_retry(name, version)

    def _schedule_retry(self, name: str, version: int) -> None:
        attempts = self._attempts(name, version)
        attempt = attempts.retries + 1
        self._cancel_retry(name, version)
        delay = min(_RETRY_FIRST * 2 ** (attempt - 1), _RETRY_MAX)
        attempts.retries = attempt
        attempts.retry = asyncio.get_running_loop().call_later(delay, self._retry_now, name, version)
        log.info("model_version_retry_scheduled", model=name, version=version, attempt=attempt, delay=delay)

    def _retry_now(self, name: str, version: int) -> None:
        self._attempts(name, version).retry_due = True
        self.request_sync(name)

    def _cancel_retry(self, name: str, version: int) -> None:
        model = self._models.get(name)
        attempts = model.versions.get(version) if model is not None else None
        if attempts is not None and attempts.retry is not None:
            attempts.retry.cancel()
            attempts.retry, attempts.retries = None, 0

    async def _retire(self, name: str, version: int, reason: str, *, notify: bool = True) -> None:
        """Deregister → give the gateway time → stop routing here → finish in-flight → unload."""
        if notify:
            for hook in self.on_retire:
                await hook(name, version)
            if self.on_retire and self.retire_delay > 0:
                await asyncio.sleep(self.retire_delay)
        served = self.catalog.retire(name, version, VersionState.DRAINING, reason)
        self.metrics.loaded.labels(name).set(len(self.catalog.ready_versions(name)))
        if served is not None:
            await self._drain(served, reason)
        self.catalog.set_status(name, version, VersionState.UNLOADED, reason)

    async def _drain(self, served: ServedVersion, reason: str) -> None:
        started = time.perf_counter()
        finished = await asyncio.to_thread(served.batcher.drain, self.drain_timeout)
        served.metrics.detach(served)
        served.model.close()
        self.metrics.unloads.labels(served.name).inc()
        await self._off_loop(_release_memory)
        log.info("model_version_unloaded", model=served.name, version=served.version, reason=reason,
                 drained=finished, seconds=round(time.perf_counter() - started, 3))

    async def close(self) -> None:
        """Drain every served version (at shutdown, after the server stopped accepting)."""
        self._closed = True
        tasks = [m.sync for m in self._models.values() if m.sync is not None]
        for model in self._models.values():
            for attempts in model.versions.values():
                if attempts.retry is not None:
                    attempts.retry.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name, versions in self.catalog.served().items():
            for version in list(versions):
                # The server already deregistered everything and waited for the gateway.
                await self._retire(name, version, "server shutting down", notify=False)
        self._executor.shutdown(wait=False, cancel_futures=True)
