"""The load pipeline: repository → ONNX Runtime session → checks → warm-up → publish; and unload.

Loads run on a small dedicated executor so they never starve the serving threads; a version is
published only after it has warmed up, and a replaced or retired version keeps serving what it
already accepted, then drains before its session is released.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from services.config import ModelConfig, load_model_config
from services.errors import ModelLoadError, ModelNotFoundError
from services.metrics import ServiceMetrics
from services.model import OnnxModel
from services.registry import ModelRegistry, ServedVersion, VersionState
from services.repository import VersionOnDisk, scan

log = structlog.get_logger(__name__)


class ModelManager:
    def __init__(self, repo: Path, registry: ModelRegistry, metrics: ServiceMetrics,
                 load_threads: int = 1, drain_timeout: float = 30.0) -> None:
        self.repo = repo
        self.registry = registry
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self._executor = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="model-load")
        self._configs: dict[str, ModelConfig] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def config(self, name: str) -> ModelConfig:
        return self._configs.get(name, ModelConfig())

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load_all(self) -> None:
        """Load every model in the repository, versions chosen by each model's policy."""
        models = await asyncio.get_running_loop().run_in_executor(self._executor, scan, self.repo)
        if not models:
            log.warning("model repository has no models", repo=str(self.repo))
        await asyncio.gather(*(self.sync_model(name) for name in models))

    async def sync_model(self, name: str) -> None:
        """Bring what is served for ``name`` in line with the disk and its version policy."""
        async with self._lock(name):
            loop = asyncio.get_running_loop()
            on_disk = (await loop.run_in_executor(self._executor, scan, self.repo)).get(name, {})
            model_dir = self.repo / name
            try:
                config = await loop.run_in_executor(self._executor, load_model_config, model_dir)
            except ModelLoadError as exc:
                # Keep serving what is loaded with the old config; report the broken file.
                log.error("model config rejected", model=name, reason=str(exc))
                self.registry.set_model_error(name, str(exc))
                return
            self.registry.set_model_error(name, None)
            self._configs[name] = config
            eligible = {v: d for v, d in on_disk.items()
                        if not config.require_ready_marker or d.has_ready_marker}
            wanted = config.version_policy.select(list(eligible))
            served = self.registry.ready_versions(name)
            for version in wanted:
                if version not in served:
                    await self._load(eligible[version], config)
            for version in served:
                if version not in wanted:
                    reason = "deleted from the repository" if version not in on_disk else "left the version policy"
                    await self._unload(name, version, reason)
            if not on_disk and not self.registry.ready_versions(name):
                log.warning("model has no versions on disk", model=name)

    async def _load(self, where: VersionOnDisk, config: ModelConfig) -> ServedVersion | None:
        name, version = where.model, where.version
        self.registry.set_status(name, version, VersionState.LOADING)
        started = time.perf_counter()
        log.info("loading model version", model=name, version=version, path=str(where.model_file))

        def build() -> OnnxModel:
            model = OnnxModel(name, version, where.model_file, config)
            model.warm_up()
            return model

        try:
            model = await asyncio.get_running_loop().run_in_executor(self._executor, build)
        except ModelLoadError as exc:
            self.registry.set_status(name, version, VersionState.UNAVAILABLE, str(exc))
            self.metrics.loads.labels(name, "failed").inc()
            log.error("model version failed to load", model=name, version=version, reason=str(exc))
            return None
        served = ServedVersion.start(model, self.metrics.for_version(name, version))
        previous = self.registry.publish(served)
        seconds = time.perf_counter() - started
        self.metrics.loads.labels(name, "ok").inc()
        self.metrics.load_seconds.labels(name).observe(seconds)
        self.metrics.loaded.labels(name).set(len(self.registry.ready_versions(name)))
        log.info("model version ready", model=name, version=version, seconds=round(seconds, 3),
                 max_batch_size=model.max_batch_size, providers=list(model.providers), sha256=model.sha256)
        if previous is not None:
            await self._drain(previous, "replaced")
        return served

    async def _unload(self, name: str, version: int, reason: str) -> None:
        served = self.registry.retire(name, version, VersionState.DRAINING, reason)
        self.metrics.loaded.labels(name).set(len(self.registry.ready_versions(name)))
        if served is not None:
            await self._drain(served, reason)
        self.registry.set_status(name, version, VersionState.UNLOADED, reason)

    async def _drain(self, served: ServedVersion, reason: str) -> None:
        started = time.perf_counter()
        finished = await served.batcher.drain(self.drain_timeout)
        self.metrics.unloads.labels(served.name).inc()
        log.info("model version unloaded", model=served.name, version=served.version, reason=reason,
                 drained=finished, seconds=round(time.perf_counter() - started, 3))

    async def unload_model(self, name: str) -> None:
        if name not in self.registry.model_names():
            raise ModelNotFoundError(f"unknown model '{name}'")
        async with self._lock(name):
            for version in self.registry.ready_versions(name):
                await self._unload(name, version, "unloaded on request")

    async def close(self) -> None:
        """Drain every served version (used at shutdown, after the server stopped accepting)."""
        for name, versions in self.registry.served().items():
            for version in list(versions):
                await self._unload(name, version, "server shutting down")
        self._executor.shutdown(wait=False, cancel_futures=True)
