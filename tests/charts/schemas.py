"""Offline validation of rendered objects: Kubernetes kinds against the OpenAPI schemas shipped by
``kubernetes-validate``, Istio kinds against the models generated from Istio's CRDs
(``cloudcoil-models-istio``), with unknown fields reported for both (strict)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from tests.charts.helpers import KUBE_VERSION

ISTIO_KINDS = {"VirtualService", "DestinationRule", "RequestAuthentication", "AuthorizationPolicy"}
ISTIO_GROUPS = {"networking.istio.io": "networking", "security.istio.io": "security"}
OPERATOR_KINDS = {"ServiceMonitor"}
"""Prometheus Operator CRDs: no offline schema package; checked by the tests' own assertions."""


def validate_kubernetes(doc: dict[str, Any]) -> list[str]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return [f"{doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}"]
    return []


def _unknown_fields(given: Any, kept: Any, path: str) -> list[str]:
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [f"{path}: not an object in the schema"]
        problems = []
        for key, value in given.items():
            if key not in kept:
                problems.append(f"{path}/{key}: unknown field")
            else:
                problems += _unknown_fields(value, kept[key], f"{path}/{key}")
        return problems
    if isinstance(given, list) and isinstance(kept, list):
        pairs = enumerate(zip(given, kept, strict=False))
        return [problem for i, (a, b) in pairs for problem in _unknown_fields(a, b, f"{path}/{i}")]
    return []


def validate_istio(doc: dict[str, Any]) -> list[str]:
    group, _, version = doc["apiVersion"].partition("/")
    if group not in ISTIO_GROUPS:
        return [f"{doc['kind']}: unexpected apiVersion {doc['apiVersion']}"]
    models = pytest.importorskip(f"cloudcoil.models.istio.{ISTIO_GROUPS[group]}.{version}",
                                 reason="pip install cloudcoil-models-istio")
    pydantic = importlib.import_module("pydantic")
    model = getattr(models, doc["kind"])
    name = f"{doc['kind']} {doc['metadata']['name']}"
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as exc:
        return [f"{name}: {'/'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [f"{name}: {problem}" for problem in _unknown_fields(doc, kept, "")]


def validate(doc: dict[str, Any]) -> list[str]:
    """Every schema problem of one rendered object (empty when valid)."""
    if doc["kind"] in ISTIO_KINDS:
        return validate_istio(doc)
    if doc["kind"] in OPERATOR_KINDS:
        return []
    return validate_kubernetes(doc)
