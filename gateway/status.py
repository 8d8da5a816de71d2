"""The status documents the controller writes back to etcd (``models/<model>/status``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from gateway.snapshot import ModelPlan, Snapshot
from mesh.registry.records import StatusDocument


def status_documents(wanted: Snapshot, live: Snapshot | None, published_at: datetime | None,
                     failure: str | None = None) -> dict[str, StatusDocument]:
    """One status per model of ``wanted``.

    Effective weights and versions come from ``live`` (what Envoy really serves); warnings and
    errors from ``wanted`` (what the registry asks for), plus ``failure`` when publishing ``wanted``
    failed and ``live`` stayed in force.
    """
    documents = {}
    for name, plan in wanted.plans.items():
        live_plan: ModelPlan | None = live.plans.get(name) if live is not None else None
        errors = list(plan.errors)
        if failure is not None:
            errors.append(failure)
        documents[name] = StatusDocument(
            effective_weights=dict(live_plan.weights) if live_plan is not None else {},
            applied_revision=live.revision if live is not None else 0,
            envoy_config_version=live.version if live is not None else "",
            published_at=published_at,
            warnings=list(plan.warnings),
            errors=errors,
            routing=live_plan.routing if live_plan is not None else None,
        )
    return documents


def same_status(a: StatusDocument | None, b: StatusDocument) -> bool:
    """Equal apart from the publish time (rewriting only that would only churn etcd)."""
    if a is None:
        return False
    return (a.effective_weights, a.applied_revision, a.envoy_config_version, a.warnings, a.errors, a.routing) == (
        b.effective_weights, b.applied_revision, b.envoy_config_version, b.warnings, b.errors, b.routing)


def changed(previous: Mapping[str, StatusDocument], current: Mapping[str, StatusDocument]) -> dict[str, StatusDocument]:
    return {name: doc for name, doc in current.items() if not same_status(previous.get(name), doc)}
