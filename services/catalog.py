"""The service's model catalog: what this process serves, looked up on every request.

(Not the etcd registry of mesh.registry: the catalog is in-process and says what is loaded here;
the registry is where the fleet advertises it.)

The whole state (what is served, every version's status, model-level errors) is one immutable
value replaced as a whole, so publishing a new version (or retiring one) is a single reference
change that a concurrent request sees entirely or not at all, and no handler thread ever iterates
a dict the event loop is changing.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mesh import protocol
from services.arrivals import Arrivals
from services.errors import ModelNotFoundError, ModelNotReadyError
from services.served import ServedVersion


class VersionState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load; reason says why
    DRAINING = "DRAINING"
    UNLOADED = "UNLOADED"


@dataclass(frozen=True, slots=True)
class VersionStatus:
    model: str
    version: int
    state: VersionState
    reason: str = ""


_Served = Mapping[str, Mapping[int, ServedVersion]]


@dataclass(frozen=True, slots=True)
class _State:
    """Everything requests read, as one immutable value. Handler threads take one reference and
    read only that; the control path builds a new value and swaps the reference, so no reader can
    ever see a dict change under it (iterating a dict another thread writes raises RuntimeError)."""

    served: _Served
    status: Mapping[tuple[str, int], VersionStatus]
    model_errors: Mapping[str, str]


class ModelCatalog:
    """What is served and every version's status; read on handler threads, written by the loop."""

    def __init__(self) -> None:
        self.arrivals = Arrivals()
        """Accepted inference requests not yet queued: shared by every version's batcher."""
        self._state = _State(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))
        # Writers come from the event loop; the lock makes a read-copy-swap atomic should a change
        # ever come from another thread (tests, future callers) instead of losing an update.
        self._write_lock = threading.Lock()

    # -- request path -------------------------------------------------------------------------
    def resolve(self, name: str, version: int | None) -> ServedVersion:
        """The version a request goes to: the one asked for, else the newest one serving."""
        state = self._state
        versions = state.served.get(name)
        if not versions:
            status = [s for (m, _), s in state.status.items() if m == name]
            model_error = state.model_errors.get(name)
            if status or model_error is not None:
                reasons = "; ".join(
                    f"version {s.version}: {s.state}" + (f" ({s.reason})" if s.reason else "")
                    for s in sorted(status, key=lambda s: s.version))
                raise ModelNotReadyError(
                    f"model '{name}' has no version ready to serve"
                    + (f": {reasons}" if reasons else f": {model_error or ''}"))
            raise ModelNotFoundError(
                f"unknown model '{protocol.clip(name)}'; serving: {', '.join(sorted(state.served)) or 'none'}")
        if version is None:
            return versions[max(versions)]
        served = versions.get(version)
        if served is None:
            known = state.status.get((name, version))
            if known is not None and known.state is not VersionState.UNLOADED:
                raise ModelNotReadyError(
                    f"model '{name}' version {version} is {known.state}"
                    + (f": {known.reason}" if known.reason else ""))
            raise ModelNotFoundError(
                f"model '{name}' has no version {version}; serving versions: "
                f"{', '.join(str(v) for v in sorted(versions))}")
        return served

    def served(self) -> _Served:
        return self._state.served

    def ready_versions(self, name: str) -> list[int]:
        return sorted(self._state.served.get(name, {}))

    # -- control path -------------------------------------------------------------------------
    def publish(self, served: ServedVersion) -> ServedVersion | None:
        """Serve ``served``; returns the instance it replaced (same name and version), if any."""
        with self._write_lock:
            current = dict(self._state.served.get(served.name, {}))
            previous = current.get(served.version)
            current[served.version] = served
            self._swap(served=self._with_versions(served.name, current),
                       status=self._with_status(served.name, served.version, VersionState.READY, ""))
        return previous

    def retire(self, name: str, version: int, state: VersionState = VersionState.DRAINING,
               reason: str = "") -> ServedVersion | None:
        """Stop routing new requests to a version; returns it so the caller can drain it."""
        with self._write_lock:
            current = dict(self._state.served.get(name, {}))
            previous = current.pop(version, None)
            self._swap(served=self._with_versions(name, current),
                       status=self._with_status(name, version, state, reason))
        return previous

    def _with_versions(self, name: str, versions: dict[int, ServedVersion]) -> _Served:
        served = dict(self._state.served)
        if versions:
            served[name] = MappingProxyType(versions)
        else:
            served.pop(name, None)
        return MappingProxyType(served)

    def _with_status(self, name: str, version: int, state: VersionState, reason: str
                     ) -> Mapping[tuple[str, int], VersionStatus]:
        status = dict(self._state.status)
        status[(name, version)] = VersionStatus(name, version, state, reason)
        return MappingProxyType(status)

    def _swap(self, *, served: _Served | None = None,
              status: Mapping[tuple[str, int], VersionStatus] | None = None,
              model_errors: Mapping[str, str] | None = None) -> None:
        """Publish a new state (under ``_write_lock``): one reference assignment."""
        old = self._state
        self._state = _State(old.served if served is None else served,
                             old.status if status is None else status,
                             old.model_errors if model_errors is None else model_errors)

    def set_status(self, name: str, version: int, state: VersionState, reason: str = "") -> None:
        with self._write_lock:
            self._swap(status=self._with_status(name, version, state, reason))

    def set_model_error(self, name: str, reason: str | None) -> None:
        """An error that belongs to the model rather than a version (e.g. a bad config.yaml)."""
        with self._write_lock:
            errors = dict(self._state.model_errors)
            if reason is None:
                if name not in errors:
                    return
                errors.pop(name)
            else:
                errors[name] = reason
            self._swap(model_errors=MappingProxyType(errors))

    def forget(self, name: str, version: int) -> None:
        with self._write_lock:
            if (name, version) not in self._state.status:
                return
            status = dict(self._state.status)
            status.pop((name, version))
            self._swap(status=MappingProxyType(status))

    def status(self, name: str, version: int) -> VersionStatus | None:
        return self._state.status.get((name, version))

    def index(self) -> list[VersionStatus]:
        """Every model and version the service knows of, with its state, sorted."""
        state = self._state
        rows = []
        for status in state.status.values():
            model_error = state.model_errors.get(status.model)
            if model_error:
                # A rejected config.yaml: the versions keep serving with the config they loaded with.
                reason = f"{status.reason}; " if status.reason else ""
                status = VersionStatus(status.model, status.version, status.state,  # noqa: PLW2901
                                       f"{reason}config rejected, still using the previous one: {model_error}")
            rows.append(status)
        known = {s.model for s in rows}
        rows.extend(VersionStatus(name, 0, VersionState.UNAVAILABLE, reason)
                    for name, reason in state.model_errors.items() if name not in known)
        return sorted(rows, key=lambda s: (s.model, s.version))

    def model_names(self) -> list[str]:
        state = self._state
        return sorted({s.model for s in state.status.values()} | set(state.model_errors))
