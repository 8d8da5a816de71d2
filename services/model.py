"""One loaded model version: an ONNX Runtime session, its signature and request validation.

Everything here is synchronous and may block: callers run it in the service's executors.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog

from mesh.protocol import clip
from services import datatypes
from services.config import ExecutionProvider, ModelConfig
from services.errors import InferenceError, InvalidRequestError, ModelLoadError, ServiceError
from services.types import InferInput, TensorSpec

log = structlog.get_logger(__name__)

DEFAULT_MAX_BATCH = 32
PLATFORM = "onnxruntime_onnx"

_OPT_LEVEL = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _first_dim(shape: Sequence[Any] | None) -> int | str | None:
    return shape[0] if shape else None


def _dims(shape: Sequence[Any] | None) -> tuple[int, ...]:
    """ONNX Runtime shapes mix ints, symbolic names and None; KServe uses -1 for all unknowns."""
    if shape is None:
        return ()
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def fingerprint(path: Path) -> tuple[int, int]:
    """Size and modification time: cheap to compare, changes whenever the file is rewritten."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _session_options(config: ModelConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.session.intra_op_threads
    options.inter_op_num_threads = config.session.inter_op_threads
    options.graph_optimization_level = _OPT_LEVEL[config.session.graph_optimization_level]
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if config.session.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.enable_cpu_mem_arena = config.session.memory_arena
    # ONNX Runtime prints warnings straight to stderr otherwise; errors still raise.
    options.log_severity_level = 3
    return options


def _providers(wanted: Sequence[ExecutionProvider], allow_cpu_fallback: bool) -> list[tuple[str, dict[str, Any]]]:
    available = set(ort.get_available_providers())
    chosen: list[tuple[str, dict[str, Any]]] = []
    for provider in wanted:
        ort_name = _PROVIDER[provider.name]
        if ort_name not in available:
            message = (f"execution provider {provider.name} ({ort_name}) is not in this ONNX Runtime build; "
                       f"available: {', '.join(sorted(available))}")
            if not allow_cpu_fallback:
                raise ModelLoadError(message + "; set allow_cpu_fallback: true to serve on CPU anyway")
            log.warning("execution_provider_missing", fallback="CPUExecutionProvider", provider=provider.name,
                        available=sorted(available))
            continue
        chosen.append((ort_name, {k: str(v) for k, v in provider.options.items()}))
    if not chosen:
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    path: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    providers: tuple[str, ...]
    load_seconds: float


class OnnxModel:
    """An ONNX Runtime session for one version of a model, with its KServe signature."""

    def __init__(self, name: str, version: int, path: Path, config: ModelConfig) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.where = f"{name}/{version}/{path.name}"
        """The file as named to clients: relative to the repository (``<repo>/<name>/<version>/``),
        because load errors reach RepositoryIndex, ModelReady and metadata answers."""
        self.config = config
        started = time.perf_counter()
        where = self.where
        if not path.is_file():
            raise ModelLoadError(f"{where}: no such file")
        try:
            self.fingerprint = fingerprint(path)
            self.sha256 = file_sha256(path)
        except OSError as exc:
            raise ModelLoadError(f"{where}: cannot read: {exc.strerror or type(exc).__name__}",
                                 transient=True) from exc
        try:
            self._session = ort.InferenceSession(
                str(path),
                sess_options=_session_options(config),
                providers=_providers(config.execution_providers, config.allow_cpu_fallback),
            )
        except ModelLoadError:
            raise
        except MemoryError as exc:
            raise ModelLoadError(f"{where}: out of memory while loading", transient=True) from exc
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/… types
            # ORT quotes the path it was given ("Load model from /srv/models/… failed").
            reason = without_paths(_first_line(exc), path, where)
            raise ModelLoadError(f"{where}: ONNX Runtime cannot load it: {reason}") from exc
        try:
            changed = fingerprint(path) != self.fingerprint
        except OSError:
            changed = True
        if changed:
            raise ModelLoadError(f"{where}: the file changed while it was being loaded", transient=True)
        self._check_providers()
        raw_inputs, raw_outputs = self._session.get_inputs(), self._session.get_outputs()
        try:
            self.inputs = tuple(TensorSpec(i.name, datatypes.from_onnx(i.type), _dims(i.shape)) for i in raw_inputs)
            self.outputs = tuple(TensorSpec(o.name, datatypes.from_onnx(o.type), _dims(o.shape))
                                 for o in raw_outputs)
        except ServiceError as exc:
            raise ModelLoadError(f"{where}: {exc}") from exc
        for spec in self.inputs:
            if spec.datatype == "BF16":
                raise ModelLoadError(f"{where}: input '{spec.name}' is BF16, which ONNX Runtime's Python API "
                                     "cannot feed; export the model with FP16 or FP32 inputs")
        self._first_dims = ([_first_dim(i.shape) for i in raw_inputs], [_first_dim(o.shape) for o in raw_outputs])
        self._input_by_name = {spec.name: spec for spec in self.inputs}
        self._output_names = [spec.name for spec in self.outputs]
        self._all_outputs = tuple(self._output_names)
        self.output_datatypes = {spec.name: spec.datatype for spec in self.outputs}
        self.max_batch_size = self._batch_size()
        self._run = self._runner()
        self.load_seconds = time.perf_counter() - started

    def _runner(self) -> _Runner:
        """What :meth:`run` calls: for a CPU-only session the binding's own ``run``.

        ``InferenceSession.run`` re-checks the input names (``validate`` did), looks for graph
        capture and retries on GPU provider failures; on CPU that is pure overhead, measured at a
        third of the call for a small model. Any other session, or an ONNX Runtime without the
        binding attribute, gets the public method."""
        binding = getattr(self._session, "_sess", None)
        direct = getattr(binding, "run", None)
        if callable(direct) and self.providers == ("CPUExecutionProvider",):
            return cast(_Runner, direct)
        return cast(_Runner, self._session.run)

    def close(self) -> None:
        """Drop the session so ONNX Runtime frees its memory (the object must not be used after)."""
        self._session = None
        self._run = _closed

    def _check_providers(self) -> None:
        wanted = [_PROVIDER[p.name] for p in self.config.execution_providers]
        active = self._session.get_providers()
        missing = [p for p in wanted if p not in active]
        if missing and "CPUExecutionProvider" not in wanted:
            message = (
                f"{self.where}: execution provider(s) {', '.join(missing)} could not be used "
                f"(ONNX Runtime fell back to {', '.join(active)})"
            )
            if not self.config.allow_cpu_fallback:
                raise ModelLoadError(message + "; set allow_cpu_fallback: true to serve on CPU anyway")
            log.warning("execution_provider_fallback", model=self.name, version=self.version,
                        missing=missing, active=active)

    def _batch_size(self) -> int:
        batchable = all(spec.shape and spec.shape[0] == -1 for spec in (*self.inputs, *self.outputs))
        inputs_first, outputs_first = self._first_dims
        names = {d for d in inputs_first if isinstance(d, str)}
        if batchable and len(names) == 1:
            # Symbolic dims tell the batch apart from other dynamic dims: an output whose first
            # dimension has another name (a [M] output of an [N, M] input) does not follow the batch.
            (batch,) = names
            batchable = all(d == batch for d in inputs_first) and all(
                d in (batch, None) for d in outputs_first)
        configured = self.config.max_batch_size
        if configured is None:
            return DEFAULT_MAX_BATCH if batchable else 0
        if configured > 0 and not batchable:
            log.warning(
                "batching_disabled", reason="not every input and output has a dynamic first dimension",
                model=self.name, version=self.version, max_batch_size=configured,
            )
            return 0
        return configured

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self._session.get_providers())

    @property
    def output_names(self) -> list[str]:
        return self._output_names

    def selected_outputs(self, requested: Sequence[str] | None) -> Sequence[str]:
        """The outputs a request gets, in answer order: those it asked for, or, when it asked for
        none, every output of the model (KServe's rule, applied here only)."""
        return requested or self._all_outputs

    def info(self) -> VersionInfo:
        return VersionInfo(self.name, self.version, self.path, self.sha256, self.inputs, self.outputs,
                           self.max_batch_size, self.providers, self.load_seconds)

    def validate(self, inputs: Sequence[InferInput], outputs: Sequence[str]) -> int:
        """Check a request against the signature; returns its batch rows (1 when not batching).

        Every message names the input and the expected vs received value.
        """
        specs = self._input_by_name
        batching = self.max_batch_size
        seen: set[str] | None = set() if len(inputs) > 1 else None
        rows = -1
        for tensor in inputs:
            name, shape = tensor.name, tensor.shape
            spec = specs.get(name)
            if spec is None:
                raise InvalidRequestError(
                    f"unknown input '{clip(name)}' for model '{self.name}' version {self.version}; "
                    f"expected inputs: {', '.join(specs)}"
                )
            if seen is not None:
                if name in seen:
                    raise InvalidRequestError(f"input '{name}' appears more than once")
                seen.add(name)
            if tensor.datatype != spec.datatype:
                raise InvalidRequestError(
                    f"input '{name}': expected datatype {spec.datatype}, got {tensor.datatype}"
                )
            if not _shape_matches(spec.shape, shape):
                raise InvalidRequestError(
                    f"input '{name}': expected shape {_fmt(spec.shape)}, got {_fmt(shape)}"
                )
            if batching:
                if rows not in (-1, shape[0]):
                    raise InvalidRequestError(
                        f"input '{name}': first (batch) dimension is {shape[0]}, other inputs have {rows}"
                    )
                rows = shape[0]
        if len(inputs) != len(specs):  # none unknown, none twice: some are missing
            given = {tensor.name for tensor in inputs}
            missing = [name for name in specs if name not in given]
            raise InvalidRequestError(
                f"missing input(s) {', '.join(repr(m) for m in missing)} for model '{self.name}' "
                f"version {self.version}"
            )
        for name in outputs:
            if name not in self._output_names:
                raise InvalidRequestError(
                    f"unknown output '{clip(name)}' requested; model '{self.name}' version {self.version} has "
                    f"outputs: {', '.join(self._output_names)}"
                )
        if self.max_batch_size and rows > self.max_batch_size:
            raise InvalidRequestError(
                f"batch of {rows} rows exceeds max_batch_size {self.max_batch_size} of model '{self.name}'"
            )
        # With batching the rows are what the request adds to a batch (0 is a valid empty batch).
        return rows if self.max_batch_size and rows >= 0 else 1

    def run(self, feeds: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str] | None = None
            ) -> list[npt.NDArray[Any]]:
        """One ONNX Runtime call. Blocking: runs on an executor thread, never on the event loop."""
        try:
            return self._run(self.selected_outputs(outputs), feeds, None)
        except Exception as exc:
            raise InferenceError(
                f"model '{self.name}' version {self.version} failed to run: {_first_line(exc)}"
            ) from exc

    def warmup_feeds(self) -> list[dict[str, npt.NDArray[Any]]]:
        """Inputs for warm-up runs: from the config, or one row generated from the signature."""
        if self.config.warmup:
            feeds: dict[str, npt.NDArray[Any]] = {}
            for item in self.config.warmup:
                spec = self._input_by_name.get(item.name)
                if spec is None:
                    raise ModelLoadError(f"warmup input '{item.name}' is not an input of the model")
                feeds[item.name] = _filled(spec.datatype, item.shape, item.fill)
            return [feeds] * self.config.warmup_runs
        generated = {spec.name: _filled(spec.datatype, tuple(d if d >= 0 else 1 for d in spec.shape), 0.0)
                     for spec in self.inputs}
        return [generated] * self.config.warmup_runs

    def warm_up(self) -> None:
        """Run the warm-up inputs. A configured warm-up that fails fails the load; the generated
        one is a guess (zeros of each input's shape) that a valid model may reject, e.g. when an
        input is a shape tensor or a split spec, so its failure is only a warning."""
        for feeds in self.warmup_feeds():
            try:
                self.run(feeds)
            except InferenceError as exc:
                if self.config.warmup:
                    raise ModelLoadError(f"{self.where}: warm-up failed: {exc}") from exc
                log.warning("generated_warmup_failed", model=self.name, version=self.version, reason=str(exc),
                            consequence="serving without warm-up (configure warmup in config.yaml to warm it up)")
                return


def signature_conflicts(old: OnnxModel, new: OnnxModel) -> list[str]:
    """Ways in which ``new`` would break a client written against ``old`` (empty: compatible)."""
    problems = _tensor_conflicts("input", old.inputs, new.inputs, check_shape=True)
    old_inputs = {spec.name for spec in old.inputs}
    problems.extend(f"new required input '{spec.name}'" for spec in new.inputs if spec.name not in old_inputs)
    problems.extend(_tensor_conflicts("output", old.outputs, new.outputs, check_shape=False))
    return problems


def _tensor_conflicts(kind: str, old: Sequence[TensorSpec], new: Sequence[TensorSpec], *, check_shape: bool
                      ) -> list[str]:
    """Removed tensors and changed datatypes (and shapes, where a client's tensor must still fit)."""
    problems: list[str] = []
    by_name = {spec.name: spec for spec in new}
    for spec in old:
        other = by_name.get(spec.name)
        if other is None:
            problems.append(f"{kind} '{spec.name}' was removed")
        elif other.datatype != spec.datatype:
            problems.append(f"{kind} '{spec.name}' changed datatype {spec.datatype} -> {other.datatype}")
        elif check_shape and not _shape_compatible(spec.shape, other.shape):
            problems.append(f"{kind} '{spec.name}' changed shape {_fmt(spec.shape)} -> {_fmt(other.shape)}")
    return problems


def _shape_compatible(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """Every request valid for ``old`` is valid for ``new``."""
    return len(old) == len(new) and all(n in (-1, o) for o, n in zip(old, new, strict=True))


def _filled(datatype: str, shape: tuple[int, ...], fill: float) -> npt.NDArray[Any]:
    if datatype == "BYTES":
        return np.full(shape, b"", dtype=np.object_)
    return np.full(shape, fill, dtype=datatypes.to_numpy(datatype))


def _shape_matches(expected: tuple[int, ...], got: tuple[int, ...]) -> bool:
    if len(expected) != len(got):
        return False
    return expected == got or all(e in (-1, g) for e, g in zip(expected, got, strict=True))


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


_Runner = Callable[[Sequence[str], Mapping[str, npt.NDArray[Any]], None], list[Any]]


def _closed(outputs: Sequence[str], feeds: Mapping[str, npt.NDArray[Any]], options: None) -> list[Any]:
    raise InferenceError("the model version was unloaded")


def without_paths(text: str, path: Path, where: str) -> str:
    """``text`` (a third-party message) with the model file's absolute path replaced by
    ``where`` and the repository's own path removed."""
    for form in {str(path), str(path.absolute()), str(path.resolve())}:
        text = text.replace(form, where)
    if len(path.parents) > 2:
        for form in {str(path.parents[2]), str(path.parents[2].resolve())}:
            if form != "/":
                text = text.replace(form + "/", "")
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
