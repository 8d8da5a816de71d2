"""The status documents the gateway controller writes back to etcd (``models/<model>/status``).

When one is written is the rule every controller shares: :func:`mesh.control.status_changed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from gateway.snapshot import ModelPlan, Snapshot
from mesh.registry.records import StatusDocument


def status_documents(wanted: Snapshot, live: Snapshot | None, published_at: datetime | None,
                     failure: str | None = None, auth: Mapping[str, str] | None = None) -> dict[str, StatusDocument]:
    """One status per model of ``wanted``.

    Effective weights, versions and the routing in force come from ``live`` (what Envoy really
    serves); warnings and errors from ``wanted`` (what the registry asks for), plus ``failure``
    when publishing ``wanted`` failed and ``live`` stayed in force; ``auth``, the authentication in
    force (:func:`gateway.tls.auth_mode`), in every one. A ``wanted`` with the content
    of ``live`` is not published again, yet it is what Envoy serves: its plans (routing document
    and revision) are reported, or a write that changes no route (a weight for a version without
    instances) would leave the status naming the document before it.
    """
    in_force = wanted if live is not None and wanted.content_hash == live.content_hash else live
    documents = {}
    for name, plan in wanted.plans.items():
        live_plan: ModelPlan | None = in_force.plans.get(name) if in_force is not None else None
        errors = list(plan.errors)
        if failure is not None:
            errors.append(failure)
        documents[name] = StatusDocument(
            effective_weights=dict(live_plan.weights) if live_plan is not None else {},
            applied_revision=in_force.revision if in_force is not None else 0,
            envoy_config_version=live.version if live is not None else "",
            published_at=published_at,
            warnings=list(plan.warnings),
            errors=errors,
            routing=live_plan.routing if live_plan is not None else None,
            routing_revision=live_plan.routing_revision if live_plan is not None else 0,
            routing_source=live_plan.routing_source if live_plan is not None else "none",
            failed_routing_revision=plan.routing_revision if failure is not None else None,
            auth=dict(auth) if auth is not None else None,
        )
    return documents
