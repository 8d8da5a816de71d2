"""The in-process model registry: what is served, looked up on every request.

The served set is an immutable mapping replaced as a whole, so publishing a new version (or
retiring one) is a single reference change that a concurrent request sees entirely or not at all.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from services.arrivals import Arrivals
from services.batcher import Batcher, Pending
from services.errors import ModelNotFoundError, ModelNotReadyError
from services.metrics import VersionMetrics
from services.model import OnnxModel
from services.stats import FOLD_AT, BatchLog, VersionStats


class VersionState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load; reason says why
    DRAINING = "DRAINING"
    UNLOADED = "UNLOADED"


@dataclass(slots=True)
class ServedVersion:
    model: OnnxModel
    batcher: Batcher
    metrics: VersionMetrics
    stats: VersionStats = field(default_factory=VersionStats)
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards ``log``, ``stats`` and ``metrics``: batches (``instances`` at a time), failed
    requests and readers of one version run on many threads."""
    log: BatchLog = field(default_factory=BatchLog)
    """Answered requests not yet added to ``stats`` and ``metrics`` (see :meth:`flush`)."""

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def inflight(self) -> int:
        return self.batcher.inflight

    @classmethod
    def start(cls, model: OnnxModel, metrics: VersionMetrics, arrivals: Arrivals | None = None) -> ServedVersion:
        """Wrap a loaded model with its queue, ready to take requests."""
        served: ServedVersion

        def on_batch(batch: Sequence[Pending], rows: int, started: float, done: float) -> None:
            # The requests' own threads record nothing on success (see Batcher).
            with served.lock:
                served.log.add(batch, rows, started, done)

        def after_batch() -> None:
            if len(served.log) >= FOLD_AT:  # read without the lock: a few requests more do not matter
                served.flush()

        served = cls(model, Batcher(model, on_batch, arrivals, after_batch), metrics)
        metrics.attach(served)
        return served

    def flush(self) -> None:
        """Add the logged requests to ``stats`` and ``metrics``: before reading either."""
        with self.lock:
            self._fold()

    def _fold(self) -> None:
        samples = self.log.take()
        if samples is not None:
            self.stats.add(samples)
            self.metrics.add(samples)


@dataclass(frozen=True, slots=True)
class VersionStatus:
    model: str
    version: int
    state: VersionState
    reason: str = ""


_Served = Mapping[str, Mapping[int, ServedVersion]]


class ModelRegistry:
    def __init__(self) -> None:
        self.arrivals = Arrivals()
        """Accepted inference requests not yet queued: shared by every version's batcher."""
        self._served: _Served = MappingProxyType({})
        self._status: dict[tuple[str, int], VersionStatus] = {}
        self._model_errors: dict[str, str] = {}

    # -- request path -------------------------------------------------------------------------
    def resolve(self, name: str, version: int | None) -> ServedVersion:
        """The version a request goes to: the one asked for, else the newest one serving."""
        versions = self._served.get(name)
        if not versions:
            status = [s for (m, _), s in self._status.items() if m == name]
            if status or name in self._model_errors:
                reasons = "; ".join(
                    f"version {s.version}: {s.state}" + (f" ({s.reason})" if s.reason else "")
                    for s in sorted(status, key=lambda s: s.version))
                raise ModelNotReadyError(
                    f"model '{name}' has no version ready to serve"
                    + (f": {reasons}" if reasons else f": {self._model_errors.get(name, '')}"))
            raise ModelNotFoundError(f"unknown model '{name}'; serving: {', '.join(sorted(self._served)) or 'none'}")
        if version is None:
            return versions[max(versions)]
        served = versions.get(version)
        if served is None:
            known = self._status.get((name, version))
            if known is not None and known.state is not VersionState.UNLOADED:
                raise ModelNotReadyError(
                    f"model '{name}' version {version} is {known.state}"
                    + (f": {known.reason}" if known.reason else ""))
            raise ModelNotFoundError(
                f"model '{name}' has no version {version}; serving versions: "
                f"{', '.join(str(v) for v in sorted(versions))}")
        return served

    def served(self) -> _Served:
        return self._served

    def ready_versions(self, name: str) -> list[int]:
        return sorted(self._served.get(name, {}))

    # -- control path -------------------------------------------------------------------------
    def publish(self, served: ServedVersion) -> ServedVersion | None:
        """Serve ``served``; returns the instance it replaced (same name and version), if any."""
        current = dict(self._served.get(served.name, {}))
        previous = current.get(served.version)
        current[served.version] = served
        self._replace(served.name, current)
        self.set_status(served.name, served.version, VersionState.READY)
        return previous

    def retire(self, name: str, version: int, state: VersionState = VersionState.DRAINING,
               reason: str = "") -> ServedVersion | None:
        """Stop routing new requests to a version; returns it so the caller can drain it."""
        current = dict(self._served.get(name, {}))
        previous = current.pop(version, None)
        self._replace(name, current)
        self.set_status(name, version, state, reason)
        return previous

    def _replace(self, name: str, versions: dict[int, ServedVersion]) -> None:
        served = dict(self._served)
        if versions:
            served[name] = MappingProxyType(versions)
        else:
            served.pop(name, None)
        self._served = MappingProxyType(served)

    def set_status(self, name: str, version: int, state: VersionState, reason: str = "") -> None:
        self._status[(name, version)] = VersionStatus(name, version, state, reason)

    def set_model_error(self, name: str, reason: str | None) -> None:
        """An error that belongs to the model rather than a version (e.g. a bad config.yaml)."""
        if reason is None:
            self._model_errors.pop(name, None)
        else:
            self._model_errors[name] = reason

    def forget(self, name: str, version: int) -> None:
        self._status.pop((name, version), None)

    def status(self, name: str, version: int) -> VersionStatus | None:
        return self._status.get((name, version))

    def index(self) -> list[VersionStatus]:
        """Every model and version the service knows of, with its state, sorted."""
        rows = []
        for status in self._status.values():
            model_error = self._model_errors.get(status.model)
            if model_error:
                # A rejected config.yaml: the versions keep serving with the config they loaded with.
                reason = f"{status.reason}; " if status.reason else ""
                status = VersionStatus(status.model, status.version, status.state,  # noqa: PLW2901
                                       f"{reason}config rejected, still using the previous one: {model_error}")
            rows.append(status)
        known = {s.model for s in rows}
        rows.extend(VersionStatus(name, 0, VersionState.UNAVAILABLE, reason)
                    for name, reason in self._model_errors.items() if name not in known)
        return sorted(rows, key=lambda s: (s.model, s.version))

    def model_names(self) -> list[str]:
        return sorted({s.model for s in self._status.values()} | set(self._model_errors))
