"""KServe v2 REST through the gateway: the REST clusters and the routes matched on the path.

gRPC routes match on the ``x-model-name`` / ``x-model-version`` headers (set by the client or
from the body, see gateway/body_routing.py); a REST request names its model in the path
(``/v2/models/{name}[/versions/{v}]/...``), so its routes match the path, anchored. They come
after the gRPC routes, which match gRPC requests only (and take all of those), and end with a 404
for any other path: a request that is neither gRPC nor KServe v2 REST is answered by the gateway.
The weights, pins, sticky header, retries, timeouts and rate limits are the model's, as for gRPC;
what the gateway answers for itself (health, server metadata, the repository index and every
refusal) is a direct response rendered from the same state, as KServe's JSON.

Pure: the functions return config dicts; nothing here reads files or talks to Envoy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from gateway.snapshot import eds_file
from mesh.protocol import VERSION_HEADER, VERSION_PATTERN, VERSION_RULE

Resource = dict[str, Any]
RouteAction = Callable[[str, Mapping[int, int], "str | None", bool], Resource]
"""(model, version → weight, sticky header, pinned) → the route action over REST clusters; a pinned
action keeps a client's ``x-model-version`` (the service refuses one that disagrees with the path)."""

REST_SUFFIX = ".rest"
SERVER_NAME = "sluice-gateway"
MODEL_ACTIONS = ("ready", "infer", "config", "stats")
"""What follows ``/v2/models/{name}[/versions/{v}]`` (nothing: the model's metadata)."""
REPOSITORY_OPERATIONS = ("load", "unload")

try:
    SERVER_VERSION = metadata.version("sluice-mesh")
except metadata.PackageNotFoundError:  # a checkout that was never installed
    SERVER_VERSION = "0+unknown"


def rest_cluster_name(model: str, version: int) -> str:
    """``iris`` version 2 → ``iris.v2.rest`` (next to the gRPC cluster ``iris.v2``)."""
    return f"{model}.v{version}{REST_SUFFIX}"


def ready_path(model: str, version: int) -> str:
    return f"/v2/models/{model}/versions/{version}/ready"


def _literal(text: str) -> str:
    # Model names hold A-Z a-z 0-9 _ . - only: the dot is the one character RE2 reads otherwise.
    return text.replace(".", r"\.")


def _path(regex: str, methods: str | None = None, headers: list[Resource] | None = None) -> Resource:
    """A match on the whole path (Envoy's safe_regex is anchored at both ends; no query string)."""
    match: Resource = {"safe_regex": {"regex": regex}}
    needs = list(headers or [])
    if methods is not None:
        needs.append({"name": ":method", "string_match": {"safe_regex": {"regex": methods}}})
    if needs:
        match["headers"] = needs
    return match


def _version_header(version: int | None = None, *, invalid: bool = False) -> list[Resource]:
    """``x-model-version`` equal to ``version``; present (None); present and not a version (invalid)."""
    if version is not None:
        return [{"name": VERSION_HEADER, "string_match": {"exact": str(version)}}]
    needs: list[Resource] = [{"name": VERSION_HEADER, "present_match": True}]
    if invalid:
        needs.append({"name": VERSION_HEADER, "string_match": {"safe_regex": {"regex": VERSION_PATTERN}},
                      "invert_match": True})
    return needs


def json_reply(status: int, doc: Any) -> Resource:
    """A direct response with ``doc`` as its JSON body."""
    return {
        "direct_response": {"status": status,
                            "body": {"inline_string": json.dumps(doc, separators=(",", ":"))}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


def _error(status: int, text: str) -> Resource:
    return json_reply(status, {"error": text})


_ACTIONS = "(/(" + "|".join(MODEL_ACTIONS) + "))?/?"
_NO_ENDPOINT = _error(404, "no KServe v2 endpoint at this path and method")


def model_rest_routes(name: str, weights: Mapping[int, int], sticky_header: str | None,
                      rest_versions: list[int], action: RouteAction, *, allow_repository_control: bool
                      ) -> list[Resource]:
    """The REST routes of one model: pins, refused versions, the split, repository control.

    ``weights`` is the model's split (as for gRPC); versions without a REST cluster are left out
    of it. ``rest_versions`` are the versions with serving REST endpoints.
    """
    model = _literal(name)
    routes: list[Resource] = []
    unversioned = f"/v2/models/{model}{_ACTIONS}"
    listed = ", ".join(str(v) for v in rest_versions) or "none"
    for version in rest_versions:
        routes.append({"name": f"rest/{name}/pin/v{version}",
                       "match": _path(f"/v2/models/{model}/versions/{version}{_ACTIONS}"),
                       "route": action(name, {version: 1}, None, True)})
    if rest_versions:
        served = "|".join(str(v) for v in rest_versions)
        routes.append({"name": f"rest/{name}/pin/other", "match": _path(f"/v2/models/{model}/versions/({served})/.*"),
                       **_NO_ENDPOINT})
    # A client's x-model-version on an unversioned path pins, as it does for gRPC.
    for version in rest_versions:
        routes.append({"name": f"rest/{name}/header-pin/v{version}",
                       "match": _path(unversioned, headers=_version_header(version)),
                       "route": action(name, {version: 1}, None, True)})
    routes.append({"name": f"rest/{name}/header-pin/invalid",
                   "match": _path(unversioned, headers=_version_header(invalid=True)),
                   **_error(400, f"{VERSION_HEADER} must be {VERSION_RULE}")})
    routes.append({"name": f"rest/{name}/header-pin/unknown",
                   "match": _path(unversioned, headers=_version_header()),
                   **_error(404, f"model '{name}' has no serving instances of the version in {VERSION_HEADER}; "
                                 f"serving versions: {listed}")})
    routes.append({"name": f"rest/{name}/pin/unknown",
                   "match": _path(f"/v2/models/{model}/versions/{VERSION_PATTERN}(/.*)?"),
                   **_error(404, f"model '{name}' has no serving instances of this version; "
                                 f"serving versions: {listed}")})
    routes.append({"name": f"rest/{name}/pin/invalid", "match": _path(f"/v2/models/{model}/versions(/.*)?"),
                   **_error(400, f"the version in the path must be {VERSION_RULE}")})
    split = {v: w for v, w in weights.items() if v in rest_versions}
    control = "/v2/repository/models/" + model + "/(" + "|".join(REPOSITORY_OPERATIONS) + ")/?"
    if split:
        routes.append({"name": f"rest/{name}/split", "match": _path(f"/v2/models/{model}{_ACTIONS}"),
                       "route": action(name, split, sticky_header, False)})
        if allow_repository_control:
            routes.append({"name": f"rest/{name}/repository", "match": _path(control, "POST"),
                           "route": action(name, split, None, False)})
        routes.append({"name": f"rest/{name}/other", "match": _path(f"/v2/models/{model}/.*"), **_NO_ENDPOINT})
    else:
        routes.append({"name": f"rest/{name}/unavailable", "match": _path(f"/v2/models/{model}(/.*)?"),
                       **_error(503, f"model '{name}' has no serving instances")})
        if allow_repository_control:
            routes.append({"name": f"rest/{name}/repository", "match": _path(control),
                           **_error(503, f"model '{name}' has no serving instances")})
    return routes


def gateway_rest_routes(models: list[str], index: list[tuple[str, int]], *, routable: bool,
                        control_setting: str, allow_repository_control: bool) -> tuple[list[Resource],
                                                                                           list[Resource]]:
    """The gateway's own REST answers: (before the model routes, after them).

    ``index`` lists every (model, version) the gateway routes; ``routable`` says whether any model
    has a split. Before: health, server metadata, the index, and the repository control refusal
    (it must come before the model routes). After: unknown models, then every other path (the
    last route: gRPC requests never get this far).
    """
    get = "GET|HEAD"
    before: list[Resource] = [
        {"name": "rest/health/live", "match": _path("/v2/health/live/?", get), **json_reply(200, {"live": True})},
        {"name": "rest/health/ready", "match": _path("/v2/health/ready/?", get),
         **json_reply(200 if routable else 503, {"ready": routable})},
        {"name": "rest/metadata", "match": _path("/v2/?", get),
         **json_reply(200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []})},
        {"name": "rest/repository/index", "match": _path("/v2/repository/index/?", "POST"),
         **json_reply(200, [{"name": m, "version": str(v), "state": "READY", "reason": ""} for m, v in index])},
    ]
    if not allow_repository_control:
        before.append({"name": "rest/repository/control",
                       "match": _path("/v2/repository/models/[^/]+/(" + "|".join(REPOSITORY_OPERATIONS) + ")/?"),
                       **_error(403, "repository load and unload are not allowed through the gateway: repository "
                                     f"control is off; start the gateway with {control_setting} to route them "
                                     "to the model services")})
    served = ", ".join(models) or "none"
    after: list[Resource] = [
        {"name": "rest/unknown-model", "match": _path("/v2/(models|repository/models)/[^/]+(/.*)?"),
         **_error(404, f"the model named in the path is not served here; served models: {served}")},
        {"name": "rest/unknown-endpoint", "match": {"prefix": "/"}, **_NO_ENDPOINT},
    ]
    return before, after


def rest_cluster(grpc_cluster: Resource, name: str, model: str, version: int) -> Resource:
    """The REST cluster of one version, made from its gRPC cluster: the same limits, outlier
    detection and health check timing, HTTP/1.1 upstream, checked on the version's ready path."""
    cluster = {key: value for key, value in grpc_cluster.items() if key != "typed_extension_protocol_options"}
    cluster["name"] = name
    cluster["alt_stat_name"] = name.replace(".", "_")
    eds = dict(grpc_cluster["eds_cluster_config"])
    eds["service_name"] = name
    source = dict(eds["eds_config"])
    path_source = dict(source["path_config_source"])
    directory = path_source["watched_directory"]["path"]
    path_source["path"] = f"{directory}/{eds_file(name)}"
    source["path_config_source"] = path_source
    eds["eds_config"] = source
    cluster["eds_cluster_config"] = eds
    checks = []
    for grpc_check in grpc_cluster["health_checks"]:
        check = {key: value for key, value in grpc_check.items() if key != "grpc_health_check"}
        check["http_health_check"] = {"path": ready_path(model, version)}
        checks.append(check)
    cluster["health_checks"] = checks
    return cluster


RATE_LIMITED = "too many requests: the gateway's rate limit for this model (--rate-limit) is used up; retry later"


def rest_local_reply_mappers(too_large: str) -> list[Resource]:
    """Envoy's own replies to REST requests (413 from the buffer filter, 503 "no healthy upstream"
    and the like) as KServe's JSON error body, which REST clients parse; gRPC's stay as they are.

    The upstream failures are picked by their response flags: the gateway's direct responses carry
    none, so their JSON is not wrapped twice.
    """
    rest = {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/v2/"}}}}
    as_json = {"json_format": {"error": "%LOCAL_REPLY_BODY%"}}
    status_413 = {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": 413, "runtime_key": "sluice.too_large"}}}}
    status_429 = {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": 429, "runtime_key": "sluice.rate_limited"}}}}
    return [
        {"filter": {"and_filter": {"filters": [rest, status_413]}}, "body": {"inline_string": too_large},
         "body_format_override": as_json},
        # The local rate limit sets its response flag only after its reply went through these
        # mappers, so its 429 (an empty body) is picked by the status: no route answers 429 itself.
        {"filter": {"and_filter": {"filters": [rest, status_429]}}, "body": {"inline_string": RATE_LIMITED},
         "body_format_override": as_json},
        {"filter": {"and_filter": {"filters": [rest, {"response_flag_filter": {}}]}},
         "body_format_override": as_json},
    ]
