"""The rollout document at ``models/<model>/rollout``: what to roll out (spec) and where it stands
(state), validated like the other registry documents (every problem named by its field).

The CLI writes the spec and operator requests; the rollout controller writes the state. Both
write with compare-and-swap on the key's mod_revision, so neither overwrites the other unseen.
"""

from __future__ import annotations

import enum
import json
import math
import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.errors import InvalidDocumentError
from mesh.registry.keys import validate_model_name
from mesh.registry.records import MAX_WEIGHT

ROLLOUT_DOCUMENT_MAX = 256 * 1024
"""Largest rollout document (JSON bytes) read or written: decisions and counter snapshots are
bounded, so a larger one is a mistake (or an attack)."""
ROUTING_VERSIONS_MAX = 100
"""Versions kept from the routing weights at the start (restored on rollback)."""
DECISIONS_KEPT = 30
"""Decisions kept in the document (oldest dropped first); the controller logs every one."""
SHADOW = "shadow"
Step = Literal["shadow"] | int


class Phase(str, enum.Enum):
    """Where a rollout is; ``promoted``, ``rolled_back`` and ``aborted`` are final."""

    PENDING = "pending"
    """Written by ``sluice rollout start``; the controller has not taken it up yet."""
    RUNNING = "running"
    PAUSED = "paused"
    """Held by an operator (``pause``) or by the controller (manual weights change, webhook)."""
    PROMOTING = "promoting"
    """The last gate passed; the before-promotion webhook is being asked."""
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def final(self) -> bool:
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK, Phase.ABORTED)


class Verdict(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    """Too few requests to judge: the step holds (and says so) instead of passing or failing."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PROMQL_GATES_MAX = 10
"""PromQL gates one rollout may have (each is one query per round once a step's interval is over)."""
PROMQL_QUERY_MAX = 2000
PROMQL_PLACEHOLDERS = ("model", "candidate", "baseline", "interval")
"""What ``{{name}}`` in a PromQL gate's query is replaced with: the model, the candidate and
baseline versions, and the step's interval as a Prometheus duration (``60s``)."""
_PLACEHOLDER_RE = re.compile(r"{{\s*([^{}]*?)\s*}}")
_GATE_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
COMPARISONS = ("<", "<=", ">", ">=")


class PromQLGate(_Strict):
    """A gate judged on a Prometheus instant query: every series of the result must satisfy
    ``value <comparison> threshold``. An empty result (or NaN) is inconclusive, never a failure
    nor a pass; an error or a timeout is inconclusive too, named in the decision."""

    name: str
    """Shown in the decision (``promql_<name>``): lower case, digits, underscores."""
    query: str = Field(min_length=1, max_length=PROMQL_QUERY_MAX)
    comparison: Literal["<", "<=", ">", ">="] = "<="
    threshold: float
    in_shadow: bool = False
    """Judged in the shadow step too (the candidate gets no callers there: most queries are empty)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _GATE_NAME_RE.fullmatch(value):
            raise ValueError(f"{value[:60]!r} is not a gate name (a-z first, then a-z, 0-9, _; at most 40)")
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        for found in _PLACEHOLDER_RE.findall(value):
            if found not in PROMQL_PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{{{found[:40]}}}}} (known: "
                                 f"{', '.join('{{' + p + '}}' for p in PROMQL_PLACEHOLDERS)})")
        return value

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def render(self, model: str, candidate: int, baseline: int, interval_s: float) -> str:
        """The query with its placeholders filled in (names and versions are validated: no quotes)."""
        values = {"model": model, "candidate": str(candidate), "baseline": str(baseline),
                  "interval": f"{max(1, math.ceil(interval_s))}s"}
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.query)

    def holds(self, value: float) -> bool:
        if self.comparison == "<":
            return value < self.threshold
        if self.comparison == "<=":
            return value <= self.threshold
        if self.comparison == ">":
            return value > self.threshold
        return value >= self.threshold


class Gates(_Strict):
    """Limits judged per step on the candidate, against the baseline in the same window."""

    max_error_rate: float = Field(0.005, ge=0.0, le=1.0)
    """Share of the candidate's requests answered with a gRPC error (any code but OK and CANCELLED)."""
    max_p99_ratio: float = Field(1.5, gt=0.0, le=1000.0)
    """Candidate p99 latency / baseline p99 latency (traffic steps; both need min_requests)."""
    p99_slack_ms: float = Field(1.0, ge=0.0, le=60_000.0)
    """A p99 within this many milliseconds of the baseline's passes whatever the ratio: at
    sub-millisecond latencies a ratio measures scheduling noise, not the model."""
    min_agreement: float = Field(0.99, ge=0.0, le=1.0)
    """Share of shadow comparisons whose outputs agreed (where any were compared)."""
    min_requests: int = Field(200, ge=1, le=10**9)
    """Candidate requests (shadow comparisons in the shadow step) a step needs before it is judged."""
    promql: tuple[PromQLGate, ...] = Field((), max_length=PROMQL_GATES_MAX)
    """Gates on Prometheus queries (the controller needs ``--prometheus-url``)."""

    @field_validator("promql")
    @classmethod
    def _unique(cls, value: tuple[PromQLGate, ...]) -> tuple[PromQLGate, ...]:
        names = [g.name for g in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two PromQL gates are named {name!r}")
        return value


class ShadowSpec(_Strict):
    """What the services do while the rollout is in force (see ``services/shadow.py``)."""

    fraction: float = Field(1.0, ge=0.0, le=1.0)
    """Share of the baseline's answered requests also run on the candidate."""
    rtol: float = Field(1e-5, ge=0.0, le=1.0)
    atol: float = Field(1e-6, ge=0.0, le=1e6)
    compare: Literal["auto", "allclose", "argmax", "exact"] = "auto"
    """``auto``: exact for integers, booleans and BYTES, allclose for floats."""


class Webhook(_Strict):
    url: str = Field(min_length=8, max_length=2048)
    timeout_s: float = Field(5.0, gt=0.0, le=60.0)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value[:80]!r} is not an http:// or https:// URL")
        return value


class Webhooks(_Strict):
    before_promotion: Webhook | None = None
    """Asked before the last step; any answer but 2xx (or none in time) pauses the rollout."""
    on_rollback: Webhook | None = None
    """Told after a rollback (best effort: a failure is logged and recorded, nothing else)."""


class Decision(_Strict):
    at: datetime
    step: int
    verdict: Verdict
    reason: str = Field(max_length=1000)
    figures: dict[str, Any] = Field(default_factory=dict)


class RolloutState(_Strict):
    """Written by the controller (operator requests aside)."""

    phase: Phase = Phase.PENDING
    step: int = Field(0, ge=0)
    """Index into ``steps``."""
    step_started: datetime | None = None
    """When the current step's window began (wall clock: survives a controller restart)."""
    weights_applied: bool = False
    """The current step's weights were written (else the controller writes them first)."""
    reason: str = Field("", max_length=1000)
    """Why the rollout is paused, rolled back, aborted or promoted."""
    request: Literal["pause", "resume", "promote", "abort"] | None = None
    """An operator request the controller has not carried out yet."""
    request_reason: str = Field("", max_length=500)
    decisions: tuple[Decision, ...] = ()
    window_start: dict[str, Any] = Field(default_factory=dict)
    """Counters per instance when the step's window began (so a restarted controller judges the
    same window); see ``mesh.rollout.figures``."""
    finishing: Phase | None = None
    """A final phase waiting for its weights: the rollout enters it once the routing write
    succeeded (a conflicting write is retried on the next round, against the routing then)."""
    finishing_weights: dict[int, int] | None = None
    """The weights that ``finishing`` writes."""
    reference: dict[str, float] | None = None
    """The baseline's figures of the window before the 100 % step (``p99_ms``), which the 100 %
    step judges the candidate against: the baseline has no callers left in its own window."""
    operator_promote: bool = False
    """The promotion under way was asked by an operator (``promote``): it ends the rollout
    without judging the 100 % step."""
    leader: str = Field("", max_length=200)
    updated: datetime | None = None

    @field_validator("finishing")
    @classmethod
    def _final(cls, value: Phase | None) -> Phase | None:
        if value is not None and not value.final:
            raise ValueError(f"{value.value!r} is not a final phase")
        return value


class RolloutDocument(_Strict):
    model: str
    candidate: int = Field(ge=1)
    baseline: int = Field(ge=1)
    steps: tuple[Step, ...] = ("shadow", 5, 25, 50, 100)
    interval_s: float = Field(60.0, ge=0.1, le=7 * 86400)
    gates: Gates = Gates()
    shadow: ShadowSpec = ShadowSpec()
    webhooks: Webhooks = Webhooks()
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    start_weights: dict[int, int] = Field(default_factory=dict, max_length=ROUTING_VERSIONS_MAX)
    """The model's routing weights when ``sluice rollout start`` ran: a rollback or abort restores
    them, with the candidate at 0 (empty, or nothing left but the candidate: the baseline at 100)."""
    state: RolloutState = RolloutState()

    @field_validator("start_weights")
    @classmethod
    def _start_weights(cls, value: dict[int, int]) -> dict[int, int]:
        for version, weight in value.items():
            if version < 1 or not 0 <= weight <= MAX_WEIGHT:
                raise ValueError(f"version {version} weight {weight}: versions are >= 1, weights 0..{MAX_WEIGHT}")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return validate_model_name(value)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("must be a non-empty list such as [\"shadow\", 5, 25, 50, 100]")
        if len(value) > 20:
            raise ValueError(f"at most 20 steps, got {len(value)}")
        for i, step in enumerate(value):
            if step == SHADOW:
                if i != 0:
                    raise ValueError("'shadow' can only be the first step")
                continue
            if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 100:
                raise ValueError(f"step {i}: {step!r} is neither 'shadow' nor a percentage 1..100")
            previous = value[i - 1] if i else None
            if isinstance(previous, int) and not isinstance(previous, bool) and step <= previous:
                raise ValueError(f"step {i}: {step} does not grow from {previous}")
        if value[-1] != 100:
            raise ValueError(f"the last step must be 100 (promotion), got {value[-1]!r}")
        return tuple(value)

    @model_validator(mode="after")
    def _versions(self) -> RolloutDocument:
        if self.candidate == self.baseline:
            raise ValueError(f"candidate and baseline are both version {self.candidate}")
        if self.state.step >= len(self.steps):
            raise ValueError(f"state.step {self.state.step} is past the last of {len(self.steps)} steps")
        return self

    @property
    def current_step(self) -> Step:
        return self.steps[self.state.step]

    def weights_for(self, step: Step) -> dict[int, int]:
        """The routing weights of a step: shadow sends every caller to the baseline, a step of N
        gives the candidate N % of what the baseline and the candidate had at the start. Other
        versions keep their weights (``start_weights``): a rollout moves weight only between its
        two versions."""
        share = 0 if step == SHADOW else int(step)
        others = {v: w for v, w in self.start_weights.items() if v not in (self.baseline, self.candidate)}
        pool = self.start_weights.get(self.baseline, 0) + self.start_weights.get(self.candidate, 0)
        if not any(others.values()) or pool == 0:
            # Nobody else has traffic (or the pair had none to move): the pair takes it all.
            return {self.baseline: 100 - share, self.candidate: share}
        # Exact shares in integers: scale every weight by k so the candidate's pool * N / 100 is whole.
        g = math.gcd(pool * share, 100)
        k = 100 // g
        weights = {**{v: w * k for v, w in others.items()},
                   self.baseline: (100 * pool - pool * share) // g, self.candidate: pool * share // g}
        if max(weights.values()) > MAX_WEIGHT:
            weights = _scaled(weights)
        return dict(sorted(weights.items()))

    def restored_weights(self) -> dict[int, int]:
        """What a rollback writes: the weights at the start, the candidate at 0."""
        weights = {v: w for v, w in self.start_weights.items() if v != self.candidate}
        if not any(weights.values()):
            weights = {self.baseline: 100}
        return {**dict(sorted(weights.items())), self.candidate: 0}

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def _scaled(weights: dict[int, int]) -> dict[int, int]:
    """``weights`` in proportion, each at most :data:`MAX_WEIGHT`. A nonzero weight stays nonzero
    (rounding would give a version with a tiny share, perhaps the candidate, no traffic at all):
    such a version gets 1, taken from the largest weight, so the total stays what scaling gave."""
    total = sum(weights.values())
    scaled = {v: round(w * MAX_WEIGHT / total) for v, w in weights.items()}
    raised = [v for v, w in weights.items() if w > 0 and scaled[v] == 0]
    for v in raised:
        scaled[v] = 1
    largest = max(scaled, key=lambda v: scaled[v])
    scaled[largest] = max(1, scaled[largest] - len(raised))  # at least MAX_WEIGHT / len(weights) before
    return scaled


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "document"
        out.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return out


def parse_rollout_document(raw: bytes | str | dict[str, Any]) -> RolloutDocument:
    """Validate a rollout document; :class:`InvalidDocumentError` lists every problem by field."""
    what = "rollout document"
    if isinstance(raw, (bytes, str)):
        if len(raw) > ROLLOUT_DOCUMENT_MAX:
            raise InvalidDocumentError(what, [f"{len(raw)} bytes, more than {ROLLOUT_DOCUMENT_MAX}"])
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidDocumentError(what, [f"not valid JSON: {exc}"]) from exc
    else:
        data = raw
    if not isinstance(data, dict):
        raise InvalidDocumentError(what, [f"must be a JSON object, got {type(data).__name__}"])
    try:
        return RolloutDocument.model_validate(data)
    except ValidationError as exc:
        raise InvalidDocumentError(what, _problems(exc)) from exc
