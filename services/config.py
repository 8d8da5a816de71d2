"""Per-model configuration: ``<repo>/<model>/config.yaml``. Every key is optional."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.errors import ModelLoadError
from services.repository import outside_repository

CONFIG_FILE = "config.yaml"
CONFIG_MAX_BYTES: Final = 256 * 1024
"""A config.yaml is a few hundred bytes; this leaves room for every label at its limits, and
anything larger is a mistake (or an attack)."""
# Labels travel in every instance record in etcd and in metadata: bounded one by one here, the
# whole record is bounded at load time (mesh.registry.records.INSTANCE_RECORD_MAX).
LABELS_MAX: Final = 64
LABEL_KEY_MAX: Final = 128
LABEL_VALUE_MAX: Final = 2048


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: ``*ref`` nested in ``*ref`` expands a file
    of a few hundred bytes into gigabytes (the "billion laughs"), and config.yaml needs neither."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the PyYAML stubs
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(problem="anchors and aliases (&name, *name, <<: *name) are not allowed",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DynamicBatching(_Strict):
    """How concurrent requests are merged into one ONNX Runtime call."""

    max_queue_delay_us: int = Field(0, ge=0, le=10_000_000)
    """Once a request waits, how long to hold it for more to arrive (0: run with what is queued)."""
    arrival_wait_us: int = Field(5000, ge=0, le=1_000_000)
    """Before a batch is taken, wait up to this long for requests the server has already accepted
    but is still receiving or decoding on other threads (0 = never). Costs a lone request nothing:
    with nothing arriving there is no wait."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Stop waiting early when the batch reaches one of these sizes."""
    max_queue_size: int = Field(1024, ge=1)
    """Requests waiting beyond this are refused with RESOURCE_EXHAUSTED."""


class SessionOptions(_Strict):
    intra_op_threads: int = Field(1, ge=0)
    inter_op_threads: int = Field(1, ge=0)
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    memory_arena: bool = True


class ExecutionProvider(_Strict):
    name: Literal["cpu", "cuda", "tensorrt"]
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class VersionPolicy(_Strict):
    """Which versions on disk are served: exactly one of ``all``, ``latest`` or ``specific``."""

    all: bool = False
    latest: int | None = Field(None, ge=1)
    specific: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        chosen = sum((self.all, self.latest is not None, self.specific is not None))
        if chosen > 1:
            raise ValueError("version_policy takes exactly one of all, latest, specific")
        return self

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve, ascending. The default (nothing set) serves all of them."""
        ordered = sorted(versions)
        if self.latest is not None:
            return ordered[-self.latest :]
        if self.specific is not None:
            wanted = set(self.specific)
            return [v for v in ordered if v in wanted]
        return ordered


class WarmupInput(_Strict):
    name: str
    datatype: str | None = None
    shape: tuple[int, ...]
    fill: float = 0.0


class ShadowConfig(_Strict):
    """Shadow comparison without a rollout (a rollout document of the model takes precedence)."""

    candidate: int = Field(ge=1)
    """The version that re-runs requests after the callers have their answers."""
    baseline: int | None = Field(None, ge=1)
    """Only requests answered by this version (default: by any other version)."""
    fraction: float = Field(0.1, ge=0.0, le=1.0)
    """Share of those requests shadowed."""
    rtol: float = Field(1e-5, ge=0.0, le=1.0)
    atol: float = Field(1e-6, ge=0.0, le=1e6)
    compare: Literal["auto", "allclose", "argmax", "exact"] = "auto"
    """auto: exact for integers, booleans and BYTES, allclose for floats; argmax for classifiers."""


class ModelConfig(_Strict):
    """Everything ``config.yaml`` may set for one model (all its versions)."""

    max_batch_size: int | None = Field(None, ge=0)
    """0 disables batching; unset means 32 where every input's first dimension is dynamic."""
    dynamic_batching: DynamicBatching = DynamicBatching()
    instances: int = Field(1, ge=1, le=64)
    """ONNX Runtime calls that may run at the same time for one version."""
    session: SessionOptions = SessionOptions()
    execution_providers: tuple[ExecutionProvider, ...] = (ExecutionProvider(name="cpu"),)
    allow_cpu_fallback: bool = False
    """With a GPU provider asked for, serve on CPU when it is not usable instead of failing."""
    version_policy: VersionPolicy = VersionPolicy()
    require_ready_marker: bool = False
    """Only load a version once a ``READY`` file exists in its folder."""
    on_signature_change: Literal["refuse", "warn"] = "refuse"
    """A version whose inputs/outputs would break clients of the version it follows: refuse or warn."""
    warmup: tuple[WarmupInput, ...] = ()
    """Warm-up inputs; when empty, one is generated from the model's signature."""
    warmup_runs: int = Field(1, ge=0, le=100)
    labels: dict[str, str] = Field(default_factory=dict)
    shadow: ShadowConfig | None = None
    """Shadow comparison of a candidate version (docs/rollouts.md)."""

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if len(value) > LABELS_MAX:
                raise ValueError(f"at most {LABELS_MAX} labels, got {len(value)}")
            labels = {str(k): str(v) for k, v in value.items()}
            for key, text in labels.items():
                if not 1 <= len(key) <= LABEL_KEY_MAX:
                    raise ValueError(f"label key of {len(key)} characters: keys are 1-{LABEL_KEY_MAX} characters")
                if len(text) > LABEL_VALUE_MAX:
                    raise ValueError(f"label '{key}': value of {len(text)} characters, at most "
                                     f"{LABEL_VALUE_MAX} allowed")
            return labels
        return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line with its position (PyYAML's own text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem or exc.context} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read ``model_dir/config.yaml``; a missing file means all defaults.

    ``model_dir`` is ``<repo>/<model>``. Errors name the file relative to the repository (they
    are shown to clients); a config.yaml that resolves outside the repository is refused unread.
    """
    path = model_dir / CONFIG_FILE
    shown = f"{model_dir.name}/{CONFIG_FILE}"
    if not path.exists():
        if path.is_symlink():
            raise ModelLoadError(f"{shown}: is a symbolic link to nothing")
        return ModelConfig()
    if outside_repository(model_dir.parent, path):
        raise ModelLoadError(f"{shown}: resolves outside the model repository (a symbolic link?); "
                             "sluice reads only files inside it")
    try:
        size = path.stat().st_size
        if size > CONFIG_MAX_BYTES:
            raise ModelLoadError(f"{shown}: {size} bytes, larger than {CONFIG_MAX_BYTES} bytes")
        with path.open("rb") as handle:
            data = handle.read(CONFIG_MAX_BYTES + 1)  # it may have grown since the stat
        if len(data) > CONFIG_MAX_BYTES:
            raise ModelLoadError(f"{shown}: larger than {CONFIG_MAX_BYTES} bytes")
        raw = yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader) or {}  # a SafeLoader subclass
    except OSError as exc:
        raise ModelLoadError(f"{shown}: cannot read: {exc.strerror or type(exc).__name__}") from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{shown}: cannot read: not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{shown}: cannot read: {_yaml_problem(exc)}") from exc
    except RecursionError:  # PyYAML builds nested nodes recursively: `a: [[[[…` a few thousand deep
        raise ModelLoadError(f"{shown}: cannot read: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{shown}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ModelLoadError(f"{shown}: {problems}") from exc
