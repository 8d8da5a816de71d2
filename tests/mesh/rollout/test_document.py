"""The rollout document: validated field by field like the other registry documents."""

from __future__ import annotations

import json

import pytest

from mesh.errors import InvalidDocumentError
from mesh.registry.records import MAX_WEIGHT
from mesh.rollout.document import ROLLOUT_DOCUMENT_MAX, parse_rollout_document


def test_defaults_round_trip() -> None:
    doc = parse_rollout_document({"model": "iris", "candidate": 3, "baseline": 2})
    assert doc.steps == ("shadow", 5, 25, 50, 100)
    again = parse_rollout_document(doc.to_json())
    assert again == doc


@pytest.mark.parametrize(("change", "problem"), [
    ({"steps": [5, "shadow", 100]}, "'shadow' can only be the first step"),
    ({"steps": ["shadow", 50, 25, 100]}, "does not grow"),
    ({"steps": ["shadow", 50]}, "the last step must be 100"),
    ({"steps": ["shadow", 0, 100]}, "neither 'shadow' nor a percentage"),
    ({"candidate": 2}, "candidate and baseline are both version 2"),
    ({"model": "../etc"}, "model"),
    ({"gates": {"max_error_rate": 2}}, "gates.max_error_rate"),
    ({"webhooks": {"on_rollback": {"url": "file:///etc/passwd"}}}, "not an http"),
    ({"surprise": 1}, "surprise"),
])
def test_every_problem_is_named(change: dict[str, object], problem: str) -> None:
    data = {"model": "iris", "candidate": 3, "baseline": 2, **change}
    with pytest.raises(InvalidDocumentError) as caught:
        parse_rollout_document(json.dumps(data))
    assert problem in str(caught.value)


def test_oversized_and_non_json_documents_are_refused_unparsed() -> None:
    with pytest.raises(InvalidDocumentError, match="more than"):
        parse_rollout_document(b" " * (ROLLOUT_DOCUMENT_MAX + 1))
    with pytest.raises(InvalidDocumentError, match="not valid JSON"):
        parse_rollout_document(b"{")
    with pytest.raises(InvalidDocumentError, match="JSON object"):
        parse_rollout_document(b"[]")


@pytest.mark.parametrize("start", [{"1": MAX_WEIGHT, "2": 1}, {"1": MAX_WEIGHT, "4": MAX_WEIGHT, "2": 1},
                                   {"1": MAX_WEIGHT, "2": 3, "3": 0}])
def test_scaled_weights_keep_every_nonzero_share(start: dict[str, int]) -> None:
    """Weights scaled down to fit MAX_WEIGHT never round a version with a share to 0: a 1 % step
    next to a version with almost all traffic still gives the candidate some."""
    doc = parse_rollout_document({"model": "iris", "candidate": 3, "baseline": 2, "steps": [1, 50, 100],
                                  "start_weights": start})
    for step, baseline_has_some in ((1, True), (50, True), (100, False)):
        weights = doc.weights_for(step)
        assert weights[3] >= 1 and (weights[2] >= 1) is baseline_has_some, (step, weights)
        assert all(weights[int(v)] >= 1 for v, w in start.items() if w and int(v) not in (2, 3)), weights
        assert max(weights.values()) <= MAX_WEIGHT
