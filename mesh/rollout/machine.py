"""The rollout state machine: pure functions from (document, observation, time) to (document,
actions). The controller does the I/O: it scrapes, calls :func:`step`, carries out the actions
(weights through the routing compare-and-swap, webhooks), then stores the document.

::

    pending ─▶ running(step 0) ─pass─▶ running(step 1) … ─pass─▶ [promoting] ─▶ promoted
                 │  ▲ inconclusive: holds    │ fail                 │ webhook refused
                 │  └────────────            ▼                      ▼
                 ├─ manual weights ─▶ paused ◀─ pause / resume ─▶ running
                 └─ fail ─▶ rolled_back        abort ─▶ aborted
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from mesh.rollout.document import (
    DECISIONS_KEPT,
    SHADOW,
    Decision,
    Phase,
    RolloutDocument,
    Verdict,
)
from mesh.rollout.figures import Counters, Figures
from mesh.rollout.promql import SERIES_KEPT, PromQLResult

P99_MIN_REQUESTS = 100
"""Requests each version needs in a window before its p99 latency is compared."""


@dataclass(frozen=True)
class Observation:
    """What the controller saw this round."""

    counters: dict[str, Counters]
    """Per instance: cumulative counters now (a new step's window starts from these)."""
    figures: Figures | None
    """The current step's window (None: no instance could be scraped)."""
    routing: dict[int, int] | None
    """The weights in etcd now (None: no or an invalid routing document)."""
    problems: tuple[str, ...] = ()
    joined: dict[str, Counters] = field(default_factory=dict)
    """Instances missing from the window start, with the counters their window starts from
    (:func:`mesh.rollout.figures.joined`); the step's window start takes them in."""
    promql: dict[str, PromQLResult] | None = None
    """The PromQL gates' results (gate name → result), queried only once a step is :func:`due`."""


@dataclass(frozen=True)
class SetWeights:
    weights: dict[int, int]
    then: Phase | None = None
    """The final phase the rollout enters once these weights are written (see :func:`written`)."""


@dataclass(frozen=True)
class CallWebhook:
    kind: Literal["before_promotion", "on_rollback"]
    payload: dict[str, Any]


Action = SetWeights | CallWebhook


def _shares(weights: dict[int, int] | None) -> dict[int, float]:
    """Weights as percentages of the versions that get traffic (so 90/10 equals 9/1)."""
    if not weights:
        return {}
    total = sum(weights.values())
    return {v: round(100.0 * w / total, 6) for v, w in sorted(weights.items()) if w > 0} if total else {}


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str
    figures: dict[str, Any]


def last_step(doc: RolloutDocument) -> bool:
    return doc.state.step == len(doc.steps) - 1


def due(doc: RolloutDocument, now: datetime) -> bool:
    """A running step whose interval is over: the round may pass it (PromQL gates are asked then)."""
    state = doc.state
    return (state.phase is Phase.RUNNING and state.finishing is None and state.request is None
            and state.weights_applied and state.step_started is not None
            and (now - state.step_started).total_seconds() >= doc.interval_s)


def _promql(doc: RolloutDocument, results: dict[str, PromQLResult] | None, shadow_step: bool,
            verdicts: dict[str, dict[str, Any]], failures: list[str]) -> list[str]:
    """Judge the PromQL gates into ``verdicts``/``failures``; returns why any is inconclusive."""
    holding: list[str] = []
    for gate in doc.gates.promql:
        if shadow_step and not gate.in_shadow:
            continue
        key = f"promql_{gate.name}"
        got = (results or {}).get(gate.name)
        shown: dict[str, Any] = {"figure": None, "limit": f"{gate.comparison} {gate.threshold:g}"}
        if got is None:
            verdicts[key] = {**shown, "verdict": "inconclusive", "detail": "not asked yet"}
            holding.append(f"PromQL gate {gate.name!r} not asked yet")
            continue
        shown["query"] = got.query[:500]
        if got.error is not None:
            verdicts[key] = {**shown, "verdict": "inconclusive", "detail": got.error}
            holding.append(f"PromQL gate {gate.name!r}: {got.error}")
            continue
        if not got.values:
            what = "an empty result" if got.series == 0 else f"{got.series} series, all NaN"
            verdicts[key] = {**shown, "verdict": "inconclusive", "detail": what}
            holding.append(f"PromQL gate {gate.name!r}: {what}")
            continue
        broken = [v for v in got.values if not gate.holds(v)]
        figure = broken[0] if broken else got.values[0]
        verdicts[key] = {**shown, "figure": figure, "values": list(got.values[:SERIES_KEPT]),
                         "verdict": "fail" if broken else "pass"}
        if broken:
            failures.append(f"PromQL gate {gate.name!r}: {figure:g} is not {gate.comparison} {gate.threshold:g}"
                            + (f" ({len(broken)} of {len(got.values)} series)" if len(got.values) > 1 else ""))
    return holding


def judge(doc: RolloutDocument, figures: Figures, *, shadow_step: bool,
          promql: dict[str, PromQLResult] | None = None) -> Judgement:
    """Every gate on one window. A gate fails as soon as its limit is broken even if every request
    still to come up to ``min_requests`` went well; it passes only with ``min_requests`` behind it.

    The 100 % step (the last) leaves the baseline no callers: its p99 ratio is judged against the
    baseline's p99 of the window before (``state.reference``)."""
    gates = doc.gates
    final = last_step(doc) and not shadow_step
    reference = (doc.state.reference or {}).get("p99_ms") if final else None
    need = gates.min_requests
    cand, base = figures.candidate, figures.baseline
    compared, agreed, shadow_errors = figures.shadow_compared, figures.shadow_agreed, figures.shadow_errors
    if shadow_step:
        n, errors, codes = compared + shadow_errors, shadow_errors, {"shadow_error": shadow_errors}
    else:
        n, errors, codes = cand.requests, cand.errors, {c: k for c, k in cand.codes.items() if c != "OK"}
    verdicts: dict[str, dict[str, Any]] = {}
    failures: list[str] = []

    error_rate = _rate(errors, n)
    limit = gates.max_error_rate
    if errors > limit * max(n, need):
        verdicts["error_rate"] = {"figure": error_rate, "limit": limit, "verdict": "fail"}
        failures.append(f"error rate {100 * (error_rate or 0):.2f}% over {n} requests "
                        f"({', '.join(f'{c}: {k}' for c, k in sorted(codes.items()) if k)}) > {100 * limit:g}%")
    else:
        verdicts["error_rate"] = {"figure": error_rate, "limit": limit, "verdict": "pass" if n >= need else
                                  "inconclusive"}

    disagreed = compared - agreed
    agreement = _rate(agreed, compared)
    if compared or shadow_step:
        allowed = (1.0 - gates.min_agreement) * max(compared, need)
        if disagreed > allowed + 1e-9:
            verdicts["agreement"] = {"figure": agreement, "limit": gates.min_agreement, "verdict": "fail"}
            failures.append(f"shadow agreement {100 * (agreement or 0):.2f}% over {compared} comparisons "
                            f"< {100 * gates.min_agreement:g}%")
        else:
            verdicts["agreement"] = {"figure": agreement, "limit": gates.min_agreement,
                                     "verdict": "pass" if compared >= need or not shadow_step else "inconclusive"}

    p99_c, p99_b = cand.quantile(0.99), base.quantile(0.99)
    if final:
        p99_b = None if reference is None else reference / 1000
    ratio = p99_c / p99_b if p99_c is not None and p99_b else None
    if not shadow_step:
        # The p99 of fewer than 100 requests is their maximum: one scheduling hiccup.
        p99_need = max(need, P99_MIN_REQUESTS)
        if cand.requests >= p99_need and (final or base.requests >= p99_need) and ratio is not None:
            ok = ratio <= gates.max_p99_ratio or (p99_c or 0) - (p99_b or 0) <= gates.p99_slack_ms / 1000
            verdicts["p99_ratio"] = {"figure": ratio, "limit": gates.max_p99_ratio, "verdict": "pass" if ok else "fail"}
            if not ok:
                failures.append(f"p99 latency {1000 * (p99_c or 0):.2f} ms is {ratio:.2f}x the baseline's "
                                f"{1000 * (p99_b or 0):.2f} ms{' (window before)' if final else ''} > "
                                f"{gates.max_p99_ratio:g}x (and more than {gates.p99_slack_ms:g} ms slower)")
        else:
            # The baseline may get too little traffic near the end: the ratio is then not judged.
            verdicts["p99_ratio"] = {"figure": ratio, "limit": gates.max_p99_ratio,
                                     "verdict": "inconclusive" if cand.requests < p99_need else "n/a"}

    holding = _promql(doc, promql, shadow_step, verdicts, failures)
    shown: dict[str, Any] = {
        "requests": n, "needed": need,
        "candidate_requests": cand.requests, "baseline_requests": base.requests,
        "candidate_error_rate": cand.error_rate, "baseline_error_rate": base.error_rate,
        "candidate_errors_by_code": {c: k for c, k in cand.codes.items() if c != "OK"},
        "p99_candidate_ms": None if p99_c is None else round(1000 * p99_c, 3),
        "p99_baseline_ms": None if p99_b is None else round(1000 * p99_b, 3),
        "shadow_compared": compared, "shadow_agreed": agreed, "shadow_candidate_errors": shadow_errors,
        "shadow_mean_abs_diff": figures.shadow.get("diff_sum", 0.0) / compared if compared else None,
        "shadow_max_abs_diff": figures.shadow.get("diff_max"),
        "instances": figures.instances, "gates": verdicts,
    }
    if final:
        shown["p99_baseline_ms"] = reference
        shown["p99_baseline_from"] = "the window before"
    if failures:
        return Judgement(Verdict.FAIL, "; ".join(failures), shown)
    if n < need:
        what = "shadow comparisons" if shadow_step else "candidate requests"
        return Judgement(Verdict.INCONCLUSIVE, f"only {n} {what} in the window, {need} needed: holding", shown)
    if verdicts.get("p99_ratio", {}).get("verdict") == "inconclusive":
        return Judgement(Verdict.INCONCLUSIVE, f"only {cand.requests} candidate requests in the window, "
                         f"{max(need, P99_MIN_REQUESTS)} needed for a p99: holding", shown)
    if holding:
        return Judgement(Verdict.INCONCLUSIVE, "; ".join(holding) + ": holding", shown)
    return Judgement(Verdict.PASS, "every gate passed", shown)


def _with(doc: RolloutDocument, **state: Any) -> RolloutDocument:
    return doc.model_copy(update={"state": doc.state.model_copy(update=state)})


def _decide(doc: RolloutDocument, now: datetime, verdict: Verdict, reason: str, figures: dict[str, Any]
            ) -> tuple[Decision, ...]:
    decision = Decision(at=now, step=doc.state.step, verdict=verdict, reason=reason[:1000], figures=figures)
    return (*doc.state.decisions, decision)[-DECISIONS_KEPT:]


def _payload(doc: RolloutDocument, event: str, reason: str) -> dict[str, Any]:
    last = doc.state.decisions[-1].model_dump(mode="json") if doc.state.decisions else None
    return {"event": event, "model": doc.model, "candidate": doc.candidate, "baseline": doc.baseline,
            "step": doc.state.step, "step_value": doc.current_step, "reason": reason, "decision": last}


def _enter(doc: RolloutDocument, index: int, obs: Observation, now: datetime, reason: str = ""
           ) -> tuple[RolloutDocument, list[Action]]:
    moved = _with(doc, phase=Phase.RUNNING, step=index, step_started=now, window_start=obs.counters,
                  weights_applied=True, reason=reason)
    return moved, [SetWeights(moved.weights_for(moved.steps[index]))]


def _finish(doc: RolloutDocument, phase: Phase, weights: dict[int, int], reason: str
            ) -> tuple[RolloutDocument, list[Action]]:
    """Head for a final phase: entered only once ``weights`` are written (:func:`written`)."""
    going = _with(doc, finishing=phase, finishing_weights=weights, reason=reason[:1000])
    return going, [SetWeights(weights, then=phase)]


_NOT_YET = " [not yet "


def written(doc: RolloutDocument) -> RolloutDocument:
    """The weights of ``finishing`` were written: the rollout enters its final phase."""
    phase = doc.state.finishing
    if phase is None:
        return doc
    return _with(doc, phase=phase, finishing=None, finishing_weights=None, weights_applied=True,
                 reason=doc.state.reason.split(_NOT_YET, 1)[0])


def not_written(doc: RolloutDocument, error: str) -> RolloutDocument:
    """Writing the weights of ``finishing`` failed (the routing changed meanwhile): the next round
    writes them again, against the routing it reads then; the reason says so."""
    phase = doc.state.finishing
    if phase is None:
        return doc
    head = doc.state.reason.split(_NOT_YET, 1)[0]
    note = (f"{_NOT_YET}{phase.value} yet: writing weights {_weights_text(doc.state.finishing_weights or {})} "
            f"failed ({error}); retrying next round]")
    return _with(doc, reason=(head[:max(0, 1000 - len(note[:600]))] + note[:600]))


def _roll_back(doc: RolloutDocument, now: datetime, phase: Phase, reason: str) -> tuple[RolloutDocument, list[Action]]:
    done, actions = _finish(doc, phase, doc.restored_weights(), reason)
    if doc.webhooks.on_rollback is not None:
        actions.append(CallWebhook("on_rollback", _payload(done, phase.value, reason)))
    return done, actions


def _promote(doc: RolloutDocument, now: datetime, obs: Observation) -> tuple[RolloutDocument, list[Action]]:
    if doc.webhooks.before_promotion is not None:
        asking = _with(doc, phase=Phase.PROMOTING, reason="asking the before-promotion webhook")
        return asking, [CallWebhook("before_promotion", _payload(asking, "before_promotion", "gates passed"))]
    return promoted(doc, now, obs)


def promoted(doc: RolloutDocument, now: datetime, obs: Observation) -> tuple[RolloutDocument, list[Action]]:
    """The promotion was allowed: an operator's ends the rollout at once; one earned by the gates
    enters the 100 % step, judged like every other before the rollout is promoted."""
    last = len(doc.steps) - 1
    if doc.state.operator_promote:
        moved, _ = _enter(_with(doc, operator_promote=False), last, obs, now)
        return _finish(moved, Phase.PROMOTED, moved.weights_for(moved.steps[last]),
                       f"version {doc.candidate} takes all traffic (promoted by an operator)")
    return _enter(doc, last, obs, now, reason=f"version {doc.candidate} takes all traffic: its 100 % step "
                  "is judged before the promotion")


def after_webhook(doc: RolloutDocument, ok: bool, detail: str, now: datetime, obs: Observation
                  ) -> tuple[RolloutDocument, list[Action]]:
    """The before-promotion webhook answered (``ok``: 2xx in time): promote, or pause saying why."""
    if doc.state.phase is not Phase.PROMOTING:
        return doc, []
    if ok:
        return promoted(doc, now, obs)
    # A refused promotion is over: the flag must not make a later, gate-earned one skip its
    # judged 100 % step.
    return _with(doc, phase=Phase.PAUSED, operator_promote=False,
                 reason=f"before-promotion webhook refused: {detail}"[:1000]), []


def _request(doc: RolloutDocument, obs: Observation, now: datetime) -> tuple[RolloutDocument, list[Action]]:
    state = doc.state
    request, why = state.request, state.request_reason
    doc = _with(doc, request=None, request_reason="")
    by = f" ({why})" if why else ""
    if request == "abort":
        return _roll_back(doc, now, Phase.ABORTED, f"aborted by an operator{by}")
    if request == "pause":
        if doc.state.phase in (Phase.RUNNING, Phase.PENDING):
            return _with(doc, phase=Phase.PAUSED, reason=f"paused by an operator{by}"), []
        return doc, []
    if request == "resume":
        if doc.state.phase is Phase.PAUSED:
            # The window restarts: what happened while paused (maybe under hand-set weights) is not
            # this step's evidence; the step's weights are written again.
            resumed = _with(doc, phase=Phase.RUNNING, step_started=now, window_start=obs.counters,
                            weights_applied=False, reason=f"resumed by an operator{by}")
            return step(resumed, obs, now)
        return doc, []
    if request == "promote":
        return _promote(_with(doc, operator_promote=True), now, obs)
    return doc, []


def step(doc: RolloutDocument, obs: Observation, now: datetime) -> tuple[RolloutDocument, list[Action]]:
    """One round: the document after it and what to do (in order) before storing it."""
    state = doc.state
    if state.phase.final:
        return (_with(doc, request=None) if state.request else doc), []
    if state.operator_promote and state.phase is not Phase.PROMOTING:
        # The flag belongs to the promotion under way only (a document written before refusals
        # cleared it may still carry one).
        doc = _with(doc, operator_promote=False)
        state = doc.state
    if state.finishing is not None:
        # A final phase whose weights are not written yet: write them again (an abort request
        # turns a pending promotion into an abort; other requests wait for the final phase).
        if state.request == "abort" and state.finishing is Phase.PROMOTED:
            return _request(_with(doc, finishing=None, finishing_weights=None), obs, now)
        return doc, [SetWeights(state.finishing_weights or doc.restored_weights(), then=state.finishing)]
    if state.request is not None:
        return _request(doc, obs, now)
    if state.phase is Phase.PENDING:
        return _enter(doc, 0, obs, now)
    if state.phase is Phase.PROMOTING:
        return doc, [CallWebhook("before_promotion", _payload(doc, "before_promotion", "gates passed"))]
    if state.phase is not Phase.RUNNING:
        return doc, []
    wanted = doc.weights_for(doc.current_step)
    if not state.weights_applied:
        return _with(doc, weights_applied=True), [SetWeights(wanted)]
    if _shares(obs.routing) != _shares(wanted):
        seen = "no routing document" if obs.routing is None else f"weights {_weights_text(obs.routing)}"
        return _with(doc, phase=Phase.PAUSED, reason=(
            f"the routing of {doc.model!r} was changed by hand ({seen}; the rollout wrote "
            f"{_weights_text(wanted)}): paused instead of overwriting it. `sluice rollout resume "
            f"{doc.model}` writes the step's weights again, `sluice rollout abort {doc.model}` rolls back")), []
    if obs.joined:
        doc = _with(doc, window_start={**state.window_start, **obs.joined})
    started = state.step_started or now
    elapsed = (now - started).total_seconds()
    if obs.figures is None:
        if elapsed < doc.interval_s:
            return doc, []
        reason = "no figures: " + ("; ".join(obs.problems) or "no instance of either version to scrape")
        return _hold(doc, now, reason[:1000], {"problems": list(obs.problems)})
    judged = judge(doc, obs.figures, shadow_step=doc.current_step == SHADOW, promql=obs.promql)
    if judged.verdict is Verdict.FAIL:
        failed = _with(doc, decisions=_decide(doc, now, Verdict.FAIL, judged.reason, judged.figures))
        return _roll_back(failed, now, Phase.ROLLED_BACK,
                          f"step {state.step} ({doc.current_step}): {judged.reason}")
    if elapsed < doc.interval_s:
        return doc, []
    if judged.verdict is Verdict.INCONCLUSIVE:
        return _hold(doc, now, judged.reason, judged.figures)
    passed = _with(doc, decisions=_decide(doc, now, Verdict.PASS, judged.reason, judged.figures))
    last = len(doc.steps) - 1
    if state.step == last:
        return _finish(passed, Phase.PROMOTED, doc.weights_for(doc.current_step),
                       f"version {doc.candidate} takes all traffic: its 100 % step passed")
    if state.step + 1 == last:
        # What the 100 % step's candidate is held to: the baseline has no callers left there.
        p99 = judged.figures.get("p99_baseline_ms")
        passed = _with(passed, reference={"p99_ms": p99} if p99 is not None else None)
        return _promote(passed, now, obs)
    return _enter(passed, state.step + 1, obs, now)


def _hold(doc: RolloutDocument, now: datetime, reason: str, figures: dict[str, Any]
          ) -> tuple[RolloutDocument, list[Action]]:
    """Inconclusive: the step holds; recorded once per interval (not every round)."""
    last = doc.state.decisions[-1] if doc.state.decisions else None
    if (last is not None and last.step == doc.state.step and last.verdict is Verdict.INCONCLUSIVE
            and (now - last.at).total_seconds() < doc.interval_s):
        return doc, []
    return _with(doc, decisions=_decide(doc, now, Verdict.INCONCLUSIVE, reason, figures),
                 reason=f"step {doc.state.step} inconclusive: {reason}"[:1000]), []


def _weights_text(weights: dict[int, int]) -> str:
    return " ".join(f"{v}={w}" for v, w in sorted(weights.items()))
