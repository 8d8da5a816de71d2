from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from mesh.errors import InvalidDocumentError
from mesh.registry.records import InstanceRecord, InstanceState, RoutingDocument, StatusDocument, parse_routing_document


def test_routing_document_round_trip() -> None:
    doc = parse_routing_document(b'{"weights": {"1": 90, "2": 10}, "sticky_header": "X-User", '
                                 b'"default_version": 1}')
    assert doc.weights == {1: 90, 2: 10}
    assert doc.sticky_header == "x-user"
    assert doc.default_version == 1
    assert json.loads(doc.to_json()) == {"weights": {"1": 90, "2": 10}, "sticky_header": "x-user",
                                         "default_version": 1}
    assert parse_routing_document(doc.to_json()) == doc
    assert doc.percentages() == {1: 90.0, 2: 10.0}


def test_zero_weights_are_allowed_next_to_positive_ones() -> None:
    assert parse_routing_document({"weights": {"1": 0, "2": 5}}).weights == {1: 0, 2: 5}


@pytest.mark.parametrize(("document", "message"), [
    ({"weights": {"x": 1}}, "weights: version 'x' is not a positive integer"),
    ({"weights": {"0": 1}}, "weights: version '0' is not a positive integer"),
    ({"weights": {"1": 0}}, "weights must sum to > 0"),
    ({"weights": {"1": 0, "2": 0}}, "weights must sum to > 0"),
    ({"weights": {"1": -5}}, "weights: weight of version '1' must be an integer 0..1000000, got -5"),
    ({"weights": {"1": 1.5}}, "weight of version '1' must be an integer"),
    ({"weights": {"1": True}}, "weight of version '1' must be an integer"),
    ({"weights": {"1": "50"}}, "weight of version '1' must be an integer"),
    ({"weights": {}}, "weights: must name at least one version"),
    ({"weights": [1, 2]}, "weights: must be an object"),
    ({}, "weights: required"),
    ({"weights": {"1": 1}, "weight": {}}, "unknown field 'weight'"),
    ({"weights": {"1": 1}, "sticky_header": "bad header"}, "sticky_header: 'bad header' is not an HTTP header"),
    ({"weights": {"1": 1}, "default_version": 0}, "default_version: 0 is not a positive integer"),
])
def test_routing_validation_names_the_bad_field(document: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidDocumentError) as excinfo:
        parse_routing_document(document)
    assert message in str(excinfo.value)
    assert str(excinfo.value).startswith("invalid routing document: ")


def test_routing_validation_reports_every_problem_at_once() -> None:
    with pytest.raises(InvalidDocumentError) as excinfo:
        parse_routing_document('{"weights": {"x": 1, "2": -1}, "extra": true}')
    assert len(excinfo.value.problems) == 3


@pytest.mark.parametrize(("raw", "message"), [("{", "not valid JSON"), ("[1]", "must be a JSON object, got list"),
                                              (b"\xff", "not valid JSON")])
def test_routing_validation_of_non_objects(raw: str | bytes, message: str) -> None:
    with pytest.raises(InvalidDocumentError, match=message):
        parse_routing_document(raw)


def test_from_weights_validates_too() -> None:
    assert RoutingDocument.from_weights({1: 3, "2": 1}).weights == {1: 3, 2: 1}
    with pytest.raises(InvalidDocumentError, match="weights must sum to > 0"):
        RoutingDocument.from_weights({1: 0})


def test_instance_record_accepts_unix_time_and_iso() -> None:
    base = {"address": "10.0.0.5:8001", "model": "iris", "version": 2, "instance_id": "pod-a"}
    from_unix = InstanceRecord.model_validate({**base, "started": 1_700_000_000})
    from_iso = InstanceRecord.model_validate({**base, "started": "2023-11-14T22:13:20Z"})
    naive = InstanceRecord.model_validate({**base, "started": "2023-11-14T22:13:20"})
    expected = datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert from_unix.started == from_iso.started == naive.started == expected
    assert from_unix.state is InstanceState.SERVING


def test_instance_record_round_trip_ignores_unknown_fields() -> None:
    record = InstanceRecord(address="127.0.0.1:8001", model="iris", version=1, instance_id="a",
                            sha256="ab" * 32, labels={"zone": "a"})
    data = json.loads(record.to_json())
    assert data["started"].endswith("Z")
    data["future_field"] = 1
    assert InstanceRecord.from_json(json.dumps(data)) == record


def test_instance_record_errors_name_fields() -> None:
    with pytest.raises(InvalidDocumentError) as excinfo:
        InstanceRecord.from_json(b'{"address": "nowhere", "model": "a/b", "version": 0, "instance_id": "i", '
                                 b'"sha256": "xyz"}')
    text = str(excinfo.value)
    for field in ("address:", "model:", "version:", "sha256:"):
        assert field in text
    assert "Value error" not in text


def test_status_document_round_trip() -> None:
    status = StatusDocument(effective_weights={1: 90, 2: 10}, applied_revision=42, envoy_config_version="v7",
                            published_at=datetime(2024, 1, 1, tzinfo=timezone.utc),
                            warnings=["version 3 has weight 5 but no serving instances"], errors=[])
    data = json.loads(status.to_json())
    assert data["effective_weights"] == {"1": 90, "2": 10}
    assert StatusDocument.from_json(status.to_json()) == status
    with pytest.raises(InvalidDocumentError, match="applied_revision"):
        StatusDocument.from_json('{"applied_revision": "soon"}')


def test_instance_record_size_problem_names_the_limit_and_the_labels() -> None:
    from mesh.registry.records import INSTANCE_RECORD_MAX

    base = {"address": "10.0.0.1:8001", "model": "iris", "version": 1, "instance_id": "svc-a"}
    assert InstanceRecord.model_validate({**base, "labels": {"team": "x" * 1000}}).size_problem() is None
    big = InstanceRecord.model_validate({**base, "labels": {"note": "x" * INSTANCE_RECORD_MAX}})
    problem = big.size_problem()
    assert problem is not None
    assert f"more than {INSTANCE_RECORD_MAX}" in problem and "labels take" in problem


def test_access_rule_round_trips_and_survives_the_status_document() -> None:
    doc = parse_routing_document({"weights": {"1": 1},
                                  "access": {"claim": "groups", "allow": ["team-a", "team-b", "team-a", "*"]}})
    assert doc.access is not None
    assert doc.access.claim == "groups"
    assert doc.access.allow == ("team-a", "team-b", "*")  # duplicates dropped, order kept
    assert json.loads(doc.to_json())["access"] == {"claim": "groups", "allow": ["team-a", "team-b", "*"]}
    assert parse_routing_document(doc.to_json()) == doc
    status = StatusDocument.from_json(StatusDocument(routing=doc).to_json())
    assert status.routing is not None
    assert parse_routing_document(status.routing.to_dict()) == doc


def test_from_weights_keeps_an_access_rule() -> None:
    rule = parse_routing_document({"weights": {"1": 1}, "access": {"claim": "groups", "allow": ["a"]}}).access
    assert RoutingDocument.from_weights({2: 1}, access=rule).access == rule
    assert RoutingDocument.from_weights({2: 1}).access is None


@pytest.mark.parametrize(("access", "message"), [
    ("groups", "access: must be an object"),
    ({"allow": ["a"]}, "access.claim: None is not a claim name"),
    ({"claim": "", "allow": ["a"]}, "access.claim: '' is not a claim name"),
    ({"claim": "a b", "allow": ["a"]}, "access.claim: 'a b' is not a claim name"),
    ({"claim": "-x", "allow": ["a"]}, "access.claim: '-x' is not a claim name"),
    ({"claim": "g" * 65, "allow": ["a"]}, "is not a claim name"),
    ({"claim": "groups"}, "access.allow: must be a non-empty list of strings"),
    ({"claim": "groups", "allow": []}, "access.allow: must be a non-empty list of strings"),
    ({"claim": "groups", "allow": "team-a"}, "access.allow: must be a non-empty list of strings"),
    ({"claim": "groups", "allow": [1]}, "access.allow: 1 is not a value"),
    ({"claim": "groups", "allow": [""]}, "access.allow: '' is not a value"),
    ({"claim": "groups", "allow": ["a\nb"]}, "is not a value: 1 to 128 printable characters"),
    ({"claim": "groups", "allow": ["v" * 129]}, "more characters]' is not a value"),
    ({"claim": "groups", "allow": [str(i) for i in range(65)]}, "access.allow: at most 64 values, got 65"),
    ({"claim": "groups", "allow": ["a"], "deny": ["b"]}, "access: unknown field 'deny' (allowed: claim, allow)"),
])
def test_access_rule_validation_names_the_bad_part(access: object, message: str) -> None:
    with pytest.raises(InvalidDocumentError) as excinfo:
        parse_routing_document({"weights": {"1": 1}, "access": access})
    assert message in str(excinfo.value)


def test_a_huge_unknown_field_name_is_clipped_in_the_error() -> None:
    with pytest.raises(InvalidDocumentError) as excinfo:
        parse_routing_document({"weights": {"1": 1}, "x" * 10_000: 1})
    assert len(str(excinfo.value)) < 400


def test_a_document_nested_too_deeply_is_an_invalid_document_not_a_crash() -> None:
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(InvalidDocumentError, match="nested too deeply"):
        parse_routing_document(deep)
    with pytest.raises(InvalidDocumentError, match="nested too deeply"):
        InstanceRecord.from_json(deep.encode())
