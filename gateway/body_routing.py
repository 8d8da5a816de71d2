"""Routing gRPC calls on the model named in the request body: the HTTP filters that do it.

Envoy picks a route from the headers before any filter has seen the body. So the name travels:
``grpc_field_extraction`` reads ``model_name`` / ``model_version`` (``name`` / ``version`` in the
control RPCs) from the first message into dynamic metadata, then a Lua filter copies them into
``x-model-name`` / ``x-model-version`` and clears the route cache; the header routes stay the one
routing mechanism. An inference call that carries ``x-model-name`` skips both filters (the cheap
path); the service compares that header with the body (services/routing.py) and refuses a
mismatch. Every other call naming a model is compared at the gateway, by the Lua filter. Either
way a header can never steer a body naming another model to that model's hosts.

Pure: the functions return config dicts; nothing here reads files or talks to Envoy.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2

from mesh.protocol import CLIENT_TEXT_MAX, MODEL_HEADER, MODEL_NAME_MAX, MODEL_NAME_RULE, VERSION_HEADER, VERSION_RULE
from protos.descriptors import SERVICE, descriptor_set, descriptor_set_base64

Resource = dict[str, Any]

EXTRACTION_FILTER = "envoy.filters.http.grpc_field_extraction"
LUA_FILTER = "envoy.filters.http.lua"

MODEL_RPCS: dict[str, tuple[str, str]] = {
    "ModelInfer": ("model_name", "model_version"),
    "ModelStreamInfer": ("model_name", "model_version"),
    "ModelReady": ("name", "version"),
    "ModelMetadata": ("name", "version"),
    "ModelConfig": ("name", "version"),
    "ModelStatistics": ("name", "version"),
    "RepositoryModelLoad": ("model_name", ""),
    "RepositoryModelUnload": ("model_name", ""),
}
"""Every RPC that names a model: method → (name field, version field; "" = none)."""
INFERENCE_RPCS = ("ModelInfer", "ModelStreamInfer")

_MATCH_INPUT = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput"
_SKIP = "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
_WITH_MATCHER = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"

# Runs after the extraction, which holds the headers back until the first message has arrived.
# Names and versions are checked against the rules of mesh/protocol.py before they become header
# values: a body is client input, and a header value must not carry control characters.
_LUA = """
local NS = "envoy.filters.http.grpc_field_extraction"

local function first(meta, key)
  if key == "" then return nil end
  local values = meta[key]
  if type(values) ~= "table" then return nil end
  local value = values[1]
  if type(value) ~= "string" or value == "" then return nil end
  return value
end

local function shown(text)
  if #text > CLIP then text = string.sub(text, 1, CLIP) .. "..." end
  -- grpc-message is percent-encoded; everything but a few plain characters is escaped.
  return (string.gsub(text, "[^%w%._%- ]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local function refuse(handle, message)
  handle:respond({[":status"] = "200", ["content-type"] = "application/grpc",
                  ["grpc-status"] = "3", ["grpc-message"] = message}, "")
end

local function valid_name(name)
  return #name <= NAME_MAX and string.match(name, "^[%w][%w_%.%-]*$") ~= nil
    and string.match(name, "[%w]$") ~= nil
end

function envoy_on_request(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if meta == nil then return end
  local headers = handle:headers()
  local name = first(meta, "model_name") or first(meta, "name")
  local version = first(meta, "model_version") or first(meta, "version")
  local named = headers:get(MODEL_HEADER)
  if named ~= nil then
    -- Only calls other than inference get here with the header (see _skip_when_header):
    -- the service compares header and body for inference itself.
    if name ~= named then
      refuse(handle, shown("model name '" .. (name or "") .. "' in the request disagrees with header " ..
                           MODEL_HEADER .. " '" .. named .. "'"))
      return
    end
  elseif name == nil then
    return
  elseif not valid_name(name) then
    refuse(handle, shown("model name '" .. name .. "' in the request is invalid: NAME_RULE"))
    return
  end
  if named == nil then headers:replace(MODEL_HEADER, name) end
  if version ~= nil then
    if #version > 18 or string.match(version, "^[1-9][0-9]*$") == nil then
      refuse(handle, shown("model version '" .. version .. "' in the request must be VERSION_RULE"))
      return
    end
    local pinned = headers:get(VERSION_HEADER)
    if pinned ~= nil and pinned ~= version then
      refuse(handle, shown("model version '" .. version .. "' in the request disagrees with header " ..
                           VERSION_HEADER .. " '" .. pinned .. "'"))
      return
    end
    headers:replace(VERSION_HEADER, version)
  end
  handle:clearRouteCache()
end
"""


def lua_source() -> str:
    """The Lua filter's code with the protocol's names and rules filled in."""
    source = _LUA
    for key, value in (("MODEL_HEADER", f'"{MODEL_HEADER}"'), ("VERSION_HEADER", f'"{VERSION_HEADER}"'),
                       ("NAME_MAX", str(MODEL_NAME_MAX)), ("CLIP", str(CLIENT_TEXT_MAX)),
                       ("NAME_RULE", MODEL_NAME_RULE), ("VERSION_RULE", VERSION_RULE)):
        source = source.replace(key, value)
    return source


@functools.cache
def service_methods() -> tuple[str, ...]:
    """The method names of the inference service, as the committed descriptor set declares them."""
    package, _, name = SERVICE.rpartition(".")
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set())
    for file in files.file:
        for service in file.service:
            if file.package == package and service.name == name:
                return tuple(method.name for method in service.method)
    raise LookupError(f"{SERVICE} is not in the descriptor set")


def _header_input(header: str) -> Resource:
    return {"name": header, "typed_config": {"@type": _MATCH_INPUT, "header_name": header}}


def _skip_when_header(name: str, extension: Resource) -> Resource:
    """``extension``, except for an inference call that names its model in ``x-model-name``.

    Inference is the hot path, and the service compares its header with the body. Every other
    call naming a model is read by the filters even with the header, and the Lua filter refuses a
    header that disagrees with the body at the gateway.
    """
    inference = "|".join(f"/{SERVICE}/{method}".replace(".", r"\.") for method in INFERENCE_RPCS)
    return {"name": name, "typed_config": {
        "@type": _WITH_MATCHER,
        "extension_config": extension,
        "xds_matcher": {"matcher_list": {"matchers": [{
            "predicate": {"and_matcher": {"predicate": [
                # Any value, the empty one included: an absent header gives the matcher no input.
                {"single_predicate": {"input": _header_input(MODEL_HEADER),
                                      "value_match": {"safe_regex": {"google_re2": {}, "regex": ".*"}}}},
                {"single_predicate": {"input": _header_input(":path"),
                                      "value_match": {"safe_regex": {"google_re2": {}, "regex": inference}}}},
            ]}},
            "on_match": {"action": {"name": "skip", "typed_config": {"@type": _SKIP}}},
        }]}},
    }}


def body_routing_filters() -> list[Resource]:
    """The extraction and the Lua filter, in this order, after the buffer filter."""
    extractions: Resource = {
        f"{SERVICE}.{method}": {"request_field_extractions": {
            field: {} for field in (name_field, version_field) if field}}
        for method, (name_field, version_field) in MODEL_RPCS.items()
    }
    extraction = {"name": EXTRACTION_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_field_extraction.v3."
                 "GrpcFieldExtractionConfig",
        "descriptor_set": {"inline_bytes": descriptor_set_base64()},
        "extractions_by_method": extractions,
    }}
    lua = {"name": LUA_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": lua_source()},
        # Cleared by the script itself, only when it set a header.
        "clear_route_cache": False,
    }}
    return [_skip_when_header("sluice.body_model.extract", extraction),
            _skip_when_header("sluice.body_model.headers", lua)]
