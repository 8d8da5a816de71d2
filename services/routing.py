"""Which model and version a request names: the one rule for every transport.

gRPC names them in the message (``model_name``, ``model_version``), REST in the path
(``/v2/models/{name}[/versions/{v}]``); through the gateway, the headers ``x-model-name`` and
``x-model-version`` say what the route chose. Both transports call :func:`routed_version`, so a
version pinned by the client and the split's choice are reconciled the same way.
"""

from __future__ import annotations

from mesh.protocol import (
    MODEL_HEADER,
    MODEL_NAME_RULE,
    VERSION_HEADER,
    VERSION_RULE,
    clip,
    is_model_name,
    parse_version_text,
)
from services.errors import InvalidRequestError


def parse_version(text: str) -> int | None:
    """Empty means "let the server choose"; otherwise the one version rule of mesh.protocol, so
    that "01", "+1" or " 1" are refused here as they are by the gateway and in etcd keys."""
    if not text:
        return None
    version = parse_version_text(text)
    if version is None:
        raise InvalidRequestError(f"model_version '{clip(text)}' is not {VERSION_RULE}")
    return version


def model_name(text: str, field: str = "model_name") -> str:
    """A model name from a client, refused unless it follows the one model-name rule: no model can
    have another name, and a refused name is echoed clipped (a 1 MiB name once made the answer's
    metadata too large for the client to read)."""
    if not text:
        raise InvalidRequestError(f"{field} is empty")
    if not is_model_name(text):
        raise InvalidRequestError(f"{field} '{clip(text)}' is not a model name: {MODEL_NAME_RULE}")
    return text


def routed_version(name: str, version_text: str, headers: tuple[str, str]) -> int | None:
    """The version to serve for a request naming ``name`` and ``version_text`` ("" = none), given
    the gateway's routing ``headers`` (model, version; "" where absent).

    The name must agree with the model header; the version header (the route's choice) is used
    when the request names none, and must agree with the one it names."""
    model_name(name)
    header_name, header_version = headers
    if header_name and header_name != name:
        raise InvalidRequestError(
            f"model_name '{clip(name)}' in the request disagrees with header {MODEL_HEADER} "
            f"'{clip(header_name)}'")
    if header_version:
        if version_text and version_text != header_version:
            raise InvalidRequestError(
                f"model_version '{clip(version_text)}' in the request disagrees with header {VERSION_HEADER} "
                f"'{clip(header_version)}' (chosen by the gateway's route); to pin a version through the "
                f"gateway, send the header {VERSION_HEADER}: {clip(version_text)}")
        version_text = header_version
    return parse_version(version_text) if version_text else None
