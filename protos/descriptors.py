"""The committed descriptor set of ``inference.GRPCInferenceService`` (every import included).

Envoy's ``grpc_field_extraction`` filter reads it to find ``model_name`` / ``model_version`` in a
request body; ``python -m protos.generate`` writes it and ``--check`` fails when it is stale.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

DESCRIPTOR_SET_PATH = Path(__file__).resolve().parent / "inference" / "grpc_service.descriptor.pb"
SERVICE = "inference.GRPCInferenceService"


@functools.cache
def descriptor_set() -> bytes:
    """The serialized ``FileDescriptorSet`` (read once per process)."""
    return DESCRIPTOR_SET_PATH.read_bytes()


@functools.cache
def descriptor_set_base64() -> str:
    """:func:`descriptor_set` as Envoy's JSON/YAML reads a ``bytes`` field (``inline_bytes``)."""
    return base64.b64encode(descriptor_set()).decode("ascii")
