from __future__ import annotations

import pytest

from mesh.errors import InvalidKeyError, InvalidNameError
from mesh.registry.keys import KeyKind, KeySchema, ParsedKey, validate_model_name, validate_version


def test_keys_follow_the_documented_layout() -> None:
    schema = KeySchema("/sluice")
    assert schema.prefix == "/sluice/"
    assert schema.models_prefix == "/sluice/models/"
    assert schema.instance("iris", 2, "pod-1:8001") == "/sluice/models/iris/instances/2/pod-1:8001"
    assert schema.instances_prefix("iris") == "/sluice/models/iris/instances/"
    assert schema.instances_prefix("iris", 2) == "/sluice/models/iris/instances/2/"
    assert schema.routing("iris") == "/sluice/models/iris/routing"
    assert schema.status("iris") == "/sluice/models/iris/status"


@pytest.mark.parametrize(("key", "parsed"), [
    ("/p/models/iris/routing", ParsedKey("iris", KeyKind.ROUTING)),
    (b"/p/models/iris/status", ParsedKey("iris", KeyKind.STATUS)),
    ("/p/models/resnet-50.v2/instances/12/host_a", ParsedKey("resnet-50.v2", KeyKind.INSTANCE, 12, "host_a")),
])
def test_parse_round_trips(key: str | bytes, parsed: ParsedKey) -> None:
    assert KeySchema("/p/").parse(key) == parsed


@pytest.mark.parametrize("key", [
    "/other/models/iris/routing",          # outside the prefix
    "/p/models/iris/weights",              # unknown kind
    "/p/models/iris/instances/1",          # no instance id
    "/p/models/iris/instances/01/a",       # non-canonical version
    "/p/models/iris/instances/0/a",        # version 0
    "/p/models/-bad/routing",              # bad model name
    "/p/models/iris/instances/1/a/extra",  # too deep
])
def test_parse_rejects_keys_outside_the_schema(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        KeySchema("/p/").parse(key)


@pytest.mark.parametrize("name", ["", "a/b", "-a", "a-", "a b", "x" * 64, "über", ".."])
def test_model_names_are_restricted_to_safe_characters(name: str) -> None:
    with pytest.raises(InvalidNameError, match="model name"):
        validate_model_name(name)


def test_model_names_allowed() -> None:
    for name in ["a", "iris", "ResNet-50", "bert_base.v2", "x" * 63]:
        assert validate_model_name(name) == name


@pytest.mark.parametrize("version", [0, -1, "0", "01", "x", True, 1.5])
def test_versions_are_positive_integers(version: object) -> None:
    with pytest.raises(InvalidNameError, match="not a positive integer"):
        validate_version(version)  # type: ignore[arg-type]


def test_prefix_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        KeySchema("sluice/")
    with pytest.raises(ValueError, match="empty segment"):
        KeySchema("/a//b/")
