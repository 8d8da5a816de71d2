"""The contract between model services, the gateway and mesh-sync: names, headers and limits.

One module so that a rule cannot differ between the side that accepts a name and the side that
later has to put it in an etcd key, an Envoy cluster name, a header value or a Kubernetes label.
Pure: no I/O, no imports from the rest of sluice.
"""

from __future__ import annotations

import re
from typing import Final

# Request headers the gateway routes on (and sets towards the services).
MODEL_HEADER: Final = "x-model-name"
VERSION_HEADER: Final = "x-model-version"

# gRPC health service names (grpc.health.v1): a service reports each model under the model's own
# name, SERVING while one of its versions is ready; the gateway's Envoy health-checks each model's
# cluster by that name, so a host without the model leaves that model's routing only.
SERVER_HEALTH_SERVICE: Final = ""
"""The whole process: SERVING from startup until it begins to stop."""

# Model names end up in etcd keys, Envoy cluster names, HTTP header values and Kubernetes labels:
# the Kubernetes label-value alphabet is the strictest of those.
MODEL_NAME_MAX: Final = 63
MODEL_NAME_RULE: Final = (f"1-{MODEL_NAME_MAX} characters A-Z a-z 0-9 _ . -, "
                          "starting and ending with a letter or digit")
_MODEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
# A version is a positive integer in canonical form: no sign, no leading zero, at most 18 digits
# (fits an int64 everywhere it travels).
VERSION_RULE: Final = "a positive integer without sign or leading zeros (at most 18 digits)"
VERSION_PATTERN: Final = r"[1-9][0-9]{0,17}"
"""The version rule as a regular expression matching a whole string (Python re and RE2 alike: the
gateway renders it into Envoy's header matchers)."""
_VERSION_RE: Final = re.compile(VERSION_PATTERN)

# Client strings (names, ids, parameters) are clipped to this many characters wherever they are
# stored, logged or echoed back in an error message.
CLIENT_TEXT_MAX: Final = 128


def is_model_name(name: object) -> bool:
    """True if ``name`` follows :data:`MODEL_NAME_RULE`."""
    return isinstance(name, str) and _MODEL_RE.fullmatch(name) is not None


def parse_version_text(text: object) -> int | None:
    """The version ``text`` names, or None when it is not :data:`VERSION_RULE` (``"01"``, ``"+1"``)."""
    if isinstance(text, str) and _VERSION_RE.fullmatch(text):
        return int(text)
    return None


def health_service_name(model: str) -> str:
    """The gRPC health service name under which a service reports ``model`` (and Envoy checks it)."""
    return model


def clip(text: str | bytes, limit: int = CLIENT_TEXT_MAX) -> str:
    """``text`` as shown in a log line or an error message: at most ``limit`` characters, with a
    marker saying how much was cut. Bytes are decoded with replacement characters."""
    if isinstance(text, bytes):
        if len(text) <= limit:
            return text.decode("utf-8", "replace")
        return f"{text[:limit].decode('utf-8', 'replace')}…[{len(text) - limit} more bytes]"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"
