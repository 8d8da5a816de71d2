"""Status documents (``models/<model>/status``) written back by a controller, and the one rule for
when one has changed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from mesh.errors import MeshError
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import StatusDocument
from mesh.registry.state import RegistryState

log = structlog.get_logger("mesh.control.status")

# Bookkeeping that moves on its own: the publish time, and the registry revision, which every
# etcd write advances (the controller's own status writes included; the gateway's config version
# names its revision anyway). Rewriting a document for these alone would only churn etcd.
_BOOKKEEPING = frozenset({"published_at", "applied_revision"})


def _reported(status: StatusDocument) -> dict[str, Any]:
    return status.model_dump(exclude=set(_BOOKKEEPING))


def status_changed(previous: StatusDocument | None, current: StatusDocument) -> bool:
    """Whether ``current`` must be written over ``previous`` (None: none is known to be in etcd).

    The one rule of every controller: a document is rewritten when what it reports changed
    (effective weights, config version, warnings, errors, routing in force), never for its
    publish time or applied revision alone.
    """
    return previous is None or _reported(previous) != _reported(current)


class StatusWriter:
    """Writes a controller's status documents when :func:`status_changed` says so.

    What is in etcd is known from the documents written here, else from the registry state the
    watch delivered (a restarted controller does not rewrite what is already there). After an
    etcd reset the written ones are forgotten (:meth:`forget`): the data went, so they are
    written again rather than trusted from memory.
    """

    def __init__(self, client: EtcdClient, schema: KeySchema, controller: str) -> None:
        self._client = client
        self._schema = schema
        self._written: dict[str, StatusDocument] = {}
        self._log = log.bind(controller=controller)

    @property
    def written(self) -> Mapping[str, StatusDocument]:
        """The document written last, per model."""
        return dict(self._written)

    def previous(self, model: str, state: RegistryState | None) -> StatusDocument | None:
        """The status document of ``model`` as etcd holds it (as far as this controller knows)."""
        if model in self._written:
            return self._written[model]
        found = state.model(model) if state is not None else None
        return found.status if found is not None else None

    def forget(self) -> None:
        """etcd lost its data: nothing written before is there any more."""
        self._written.clear()

    async def write(self, documents: Mapping[str, StatusDocument], state: RegistryState | None) -> None:
        """Write each document of ``documents`` that changed; ``state``: the registry as watched
        (not a view with held models: their old status documents are gone with the old data)."""
        for model, document in documents.items():
            if not status_changed(self.previous(model, state), document):
                continue
            try:
                await self._client.put(self._schema.status(model), document.to_json())
                self._written[model] = document
            except MeshError as exc:
                self._log.warning("status_write_failed", model=model, error=str(exc))

    async def remove(self, models: Iterable[str]) -> None:
        """Delete the status documents of models that left the registry."""
        for model in models:
            with contextlib.suppress(MeshError):
                await self._client.delete(self._schema.status(model))
            self._written.pop(model, None)
