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
LoadCheck = Callable[[OnnxModel], None]
"""Raises ModelLoadError when a loaded version must not be published (e.g. its etcd record would
be too large); runs on the loop, so it must be cheap."""
CONTROL_SETTING = "--repository-control (SLUICE_REPOSITORY_CONTROL=true)"

_T = TypeVar("_T")
_RETRY_FIRST = 1.0
_RETRY_MAX = 60.0


def _release_memory() -> None:
    """Hand freed heap pages back to the OS after a session is dropped (glibc keeps them otherwise)."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


class ModelManager:
    def __init__(self, repo: Path, catalog: ModelCatalog, metrics: ServiceMetrics, *,
                 load_threads: int = 1, drain_timeout: float = 30.0, quiet_seconds: float = 0.3,
                 retire_delay: float = 0.0, repository_control: bool = False) -> None:
        self.repo = repo
        self.catalog = catalog
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self.quiet_seconds = quiet_seconds
        self.retire_delay = retire_delay
        """Seconds between deregistering a version and draining it (gateway catch-up time)."""
        self.repository_control = repository_control
        """Whether clients may load and unload models explicitly (an admin surface, off by default)."""
        self.on_ready: list[ReadyHook] = []
        self.on_retire: list[RetireHook] = []
        self.load_checks: list[LoadCheck] = []
        self._executor = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="model-load")
        self._locks: dict[str, asyncio.Lock] = {}
        self._held: set[str] = set()
        self._scheduled: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._retries: dict[tuple[str, int], tuple[int, asyncio.TimerHandle]] = {}
        # What the files of a failed version looked like: it is tried again only once they change
        # (or when its failure was transient and its retry timer fires).
        self._failed_files: dict[tuple[str, int], tuple[object, ModelConfig]] = {}
        self._due_retries: set[tuple[str, int]] = set()
        self._closed = False

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _off_loop(self, func: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    # -- entry points ---------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every model in the repository, versions chosen by each model's policy."""
        found = await self._off_loop(scan, self.repo)
        for folder, reason in found.refused.items():
            self.catalog.set_model_error(protocol.clip(folder), reason)
        if not found.models:
            log.warning("model repository has no models", repo=str(self.repo))
        await asyncio.gather(*(self.sync_model(name, wait_quiet=False) for name in found.models))

    def request_sync(self, name: str) -> None:
        """Schedule a sync of ``name`` (watcher, retries); bursts coalesce into one more run."""
        if self._closed or name in self._held:
            return
        running = self._scheduled.get(name)
        if running is not None and not running.done():
            self._dirty.add(name)
            return

        async def run() -> None:
            while True:
                self._dirty.discard(name)
                try:
                    await self.sync_model(name)
                except Exception:  # never let one model's failure stop the watcher
                    log.exception("model sync failed", model=name)
                if name not in self._dirty or self._closed:
                    return

        self._scheduled[name] = asyncio.create_task(run(), name=f"sync-{name}")

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
        self._held.discard(name)
        await self.sync_model(name, wait_quiet=False)

    async def unload_model(self, name: str) -> None:
        """Explicit unload (RepositoryModelUnload): stays unloaded until loaded explicitly."""
        self.check_control("RepositoryModelUnload", name)
        if name not in self.catalog.model_names():
            raise ModelNotFoundError(f"unknown model '{name}'")
        self._held.add(name)
        async with self._lock(name):
            for version in self.catalog.ready_versions(name):
                await self._retire(name, version, "unloaded on request")

    # -- the sync ---------------------------------------------------------------------------------
    async def sync_model(self, name: str, *, wait_quiet: bool = True) -> None:
        """Bring what is served for ``name`` in line with the disk and its version policy."""
        if not protocol.is_model_name(name):
            await self._refuse_folder(name)
            return
        async with self._lock(name):
            if wait_quiet and not await self._quiet(self.repo / name):
                self.request_sync(name)  # still being written: look again once it settles
                return
            on_disk = await self._off_loop(scan_versions, self.repo, name)
            try:
                if await self._off_loop(outside_repository, self.repo, self.repo / name):
                    raise ModelLoadError(f"{name}: the model folder resolves outside the model repository "
                                         "(a symbolic link?); sluice reads only files inside it")
                config = await self._off_loop(load_model_config, self.repo / name)
            except ModelLoadError as exc:
                # Keep serving what is loaded with the config it was loaded with.
                log.error("model config rejected", model=name, reason=str(exc))
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
                    failed = self._failed_files.get((name, version))
                    if failed == (files, config) and (name, version) not in self._due_retries:
                        continue  # same broken files as last time: wait for a change
                    self._due_retries.discard((name, version))
                    if not await self._load(where, config, current):
                        self._failed_files[(name, version)] = (files, config)
                    else:
                        self._failed_files.pop((name, version), None)
            for version in list(self.catalog.ready_versions(name)):
                if version not in wanted:
                    reason = "deleted from the repository" if version not in on_disk else "left the version policy"
                    await self._retire(name, version, reason)
            for version in [v for (m, v) in self._retries if m == name and v not in wanted]:
                self._cancel_retry(name, version)
            for status in [s for s in self.catalog.index() if s.model == name and s.version
                           and s.version not in on_disk and s.state is not VersionState.READY]:
                self.catalog.forget(name, status.version)  # failed versions that were deleted
            if not on_disk and not self.catalog.ready_versions(name):
                log.warning("model has no versions on disk", model=name)

    async def _refuse_folder(self, folder: str) -> None:
        """A model folder whose name breaks the rule (found by the watcher): shown in
        RepositoryIndex while it exists, never loaded."""
        shown = protocol.clip(folder)
        if await self._off_loop((self.repo / folder).is_dir):
            log.warning("model folder refused: invalid model name", folder=shown, rule=protocol.MODEL_NAME_RULE)
            self.catalog.set_model_error(shown, repository.invalid_name_reason(folder))
        else:
            self.catalog.set_model_error(shown, None)

    async def _quiet(self, model_dir: Path) -> bool:
        """True when nothing under ``model_dir`` changed for the quiet interval."""
        before = await self._off_loop(snapshot, model_dir)
        await asyncio.sleep(self.quiet_seconds)
        return before == await self._off_loop(snapshot, model_dir)

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
        log.info("loading model version", model=name, version=version, path=str(where.model_file),
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
                detail = without_paths(str(exc).strip()[:500], where.model_file, where.shown_file)
                raise ModelLoadError(f"{where.shown_file}: {type(exc).__name__}: {detail}") from exc
            return model

        try:
            model = await self._off_loop(build)
            if current is not None and model.sha256 == current.model.sha256 and current.model.config == config:
                current.model.fingerprint = model.fingerprint  # touched, not changed
                model.close()
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
            return False
        self._cancel_retry(name, version)
        served = ServedVersion.start(model, self.metrics.for_version(name, version), self.catalog.arrivals)
        previous = self.catalog.publish(served)
        seconds = time.perf_counter() - started
        self.metrics.loads.labels(name, "ok").inc()
        self.metrics.load_seconds.labels(name).observe(seconds)
        self.metrics.loaded.labels(name).set(len(self.catalog.ready_versions(name)))
        log.info("model version ready", model=name, version=version, seconds=round(seconds, 3),
                 max_batch_size=model.max_batch_size, providers=list(model.providers), sha256=model.sha256,
                 replaced=previous is not None)
        for hook in self.on_ready:
            await hook(served)
        if previous is not None:
            await self._drain(previous, "replaced by a new copy")
        return True

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
        log.warning("model signature changed", model=model.name, version=model.version, problems=problems)

    def _failed(self, name: str, version: int, exc: ModelLoadError, *, serving: bool) -> None:
        reason = str(exc)
        self.metrics.loads.labels(name, "failed").inc()
        if serving:
            # The copy that was serving keeps serving; the failure is reported next to it.
            self.catalog.set_status(name, version, VersionState.READY, f"reload failed: {reason}")
        else:
            self.catalog.set_status(name, version, VersionState.UNAVAILABLE, reason)
        log.error("model version failed to load", model=name, version=version, reason=reason,
                  transient=exc.transient, still_serving_previous=serving)
        if exc.transient:
            self._schedule_retry(name, version)

    def _schedule_retry(self, name: str, version: int) -> None:
        attempt = self._retries[(name, version)][0] + 1 if (name, version) in self._retries else 1
        self._cancel_retry(name, version)
        delay = min(_RETRY_FIRST * 2 ** (attempt - 1), _RETRY_MAX)
        handle = asyncio.get_running_loop().call_later(delay, self._retry_now, name, version)
        self._retries[(name, version)] = (attempt, handle)
        log.info("will retry loading", model=name, version=version, attempt=attempt, delay=delay)

    def _retry_now(self, name: str, version: int) -> None:
        self._due_retries.add((name, version))
        self.request_sync(name)

    def _cancel_retry(self, name: str, version: int) -> None:
        entry = self._retries.pop((name, version), None)
        if entry is not None:
            entry[1].cancel()

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
        log.info("model version unloaded", model=served.name, version=served.version, reason=reason,
                 drained=finished, seconds=round(time.perf_counter() - started, 3))

    async def close(self) -> None:
        """Drain every served version (at shutdown, after the server stopped accepting)."""
        self._closed = True
        for _attempt, handle in self._retries.values():
            handle.cancel()
        for task in self._scheduled.values():
            task.cancel()
        await asyncio.gather(*self._scheduled.values(), return_exceptions=True)
        for name, versions in self.catalog.served().items():
            for version in list(versions):
                # The server already deregistered everything and waited for the gateway.
                await self._retire(name, version, "server shutting down", notify=False)
        self._executor.shutdown(wait=False, cancel_futures=True)
