"""Transport-free request/response objects of the data plane."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

ParameterValue = bool | int | str | float


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model: KServe datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class Tensor:
    """A named tensor of a request or a response: KServe datatype, shape and its data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]


class InferInput(Tensor):
    """An input tensor of a request."""

    __slots__ = ()


@dataclass(slots=True)
class InferRequest:
    model: str
    version: int | None
    inputs: list[InferInput]
    outputs: list[str] = field(default_factory=list)
    """Requested outputs; empty means all of them."""
    id: str = ""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    deadline: float | None = None
    """Absolute time.monotonic() after which the request is not worth running."""


class InferOutput(Tensor):
    """An output tensor of a response."""

    __slots__ = ()


@dataclass(slots=True)
class InferResponse:
    model: str
    version: int
    id: str
    outputs: list[InferOutput]
    parameters: dict[str, ParameterValue] = field(default_factory=dict)

