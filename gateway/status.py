"""The status documents the gateway controller writes back to etcd (``models/<model>/status``).

When one is written is the rule every controller shares: :func:`mesh.control.status_changed`.
"""

from __future__ import annotations

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
