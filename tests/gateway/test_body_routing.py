"""The body-routing filters as rendered: order, methods and fields, the skip rule, the Lua script."""

from __future__ import annotations

import base64
import re
from typing import Any

from google.protobuf import descriptor_pb2

from gateway.body_routing import EXTRACTION_FILTER, INFERENCE_RPCS, LUA_FILTER, MODEL_RPCS, lua_source
from gateway.render import default_render_options, render_snapshot
from mesh.registry.keys import KeySchema
from mesh.registry.state import build_state
from protos.descriptors import DESCRIPTOR_SET_PATH, SERVICE

OPTIONS = default_render_options(xds_dir="/tmp/sluice-xds", rate_limits={"iris": 5})


def http_filters() -> list[dict[str, Any]]:
    snapshot = render_snapshot(build_state(KeySchema("/t/"), 0, []), {}, OPTIONS)
    hcm = snapshot.listener["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def inner(item: dict[str, Any]) -> dict[str, Any]:
    config = item["typed_config"]
    return dict(config.get("extension_config", item))


def test_filter_order_buffer_then_extraction_then_lua_then_the_rest() -> None:
    names = [inner(f)["name"] for f in http_filters()]
    assert names == ["envoy.filters.http.buffer", EXTRACTION_FILTER, LUA_FILTER,
                     "envoy.filters.http.local_ratelimit", "envoy.filters.http.grpc_stats",
                     "envoy.filters.http.router"]


def test_extraction_covers_every_rpc_naming_a_model_with_the_committed_descriptors() -> None:
    extraction = inner(http_filters()[1])["typed_config"]
    methods = extraction["extractions_by_method"]
    assert set(methods) == {f"{SERVICE}.{m}" for m in MODEL_RPCS}
    assert set(methods[f"{SERVICE}.ModelInfer"]["request_field_extractions"]) == {"model_name", "model_version"}
    assert set(methods[f"{SERVICE}.ModelReady"]["request_field_extractions"]) == {"name", "version"}
    assert set(methods[f"{SERVICE}.RepositoryModelUnload"]["request_field_extractions"]) == {"model_name"}
    blob = base64.b64decode(extraction["descriptor_set"]["inline_bytes"])
    assert blob == DESCRIPTOR_SET_PATH.read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(blob).file
    service = next(s for f in files for s in f.service if f"{f.package}.{s.name}" == SERVICE)
    requests = {m.name: m.input_type.rpartition(".")[2] for m in service.method}
    messages = {m.name: {fld.name for fld in m.field} for f in files for m in f.message_type}
    for method, fields in MODEL_RPCS.items():
        assert {f for f in fields if f} <= messages[requests[method]], method


def test_only_inference_with_the_model_header_skips_the_filters() -> None:
    for item in http_filters()[1:3]:
        matcher = item["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][0]
        header, path = matcher["predicate"]["and_matcher"]["predicate"]
        assert header["single_predicate"]["input"]["typed_config"]["header_name"] == "x-model-name"
        assert path["single_predicate"]["input"]["typed_config"]["header_name"] == ":path"
        regex = path["single_predicate"]["value_match"]["safe_regex"]["regex"]
        for method in MODEL_RPCS:
            skipped = re.fullmatch(regex, f"/{SERVICE}/{method}") is not None
            assert skipped == (method in INFERENCE_RPCS), method
        assert re.fullmatch(regex, f"/{SERVICE}xModelInfer") is None
        assert matcher["on_match"]["action"]["typed_config"]["@type"].endswith("SkipFilter")


def test_lua_clears_the_route_cache_itself_and_has_every_rule_filled_in() -> None:
    lua = inner(http_filters()[2])["typed_config"]
    assert lua["clear_route_cache"] is False
    source = lua_source()
    assert lua["default_source_code"]["inline_string"] == source
    assert "handle:clearRouteCache()" in source
    for placeholder in ("MODEL_HEADER", "VERSION_HEADER", "NAME_MAX", "NAME_RULE", "VERSION_RULE", "CLIP"):
        assert placeholder not in source
    assert '"x-model-name"' in source and '"x-model-version"' in source and "#name <= 63" in source
