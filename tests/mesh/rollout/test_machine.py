"""The rollout state machine, without etcd: documents, figures and time in, document and actions out."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from mesh.rollout.document import Phase, RolloutDocument, Verdict, parse_rollout_document
from mesh.rollout.figures import Figures, VersionFigures
from mesh.rollout.machine import (
    CallWebhook,
    Observation,
    SetWeights,
    after_webhook,
    judge,
    not_written,
    step,
    written,
)
from mesh.rollout.promql import PromQLResult

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
BUCKETS_FAST = {"0.001": 0.0, "0.005": 1.0, "0.01": 1.0, "+Inf": 1.0}


def doc(**overrides: Any) -> RolloutDocument:
    data: dict[str, Any] = {"model": "iris", "candidate": 3, "baseline": 2, "interval_s": 10,
                            "gates": {"min_requests": 100}}
    data.update(overrides)
    return parse_rollout_document(data)


def version(ok: int, errors: dict[str, int] | None = None, p99_bucket: str = "0.005") -> VersionFigures:
    codes = {"OK": ok, **(errors or {})}
    total = sum(codes.values())
    buckets = {le: (float(total) if float(le.replace("+Inf", "inf")) >= float(p99_bucket) else 0.0)
               for le in ("0.001", "0.005", "0.01", "0.05", "+Inf")}
    return VersionFigures(total, codes, buckets)


def figures(candidate: VersionFigures | None = None, baseline: VersionFigures | None = None,
            compared: int = 0, agreed: int | None = None, shadow_errors: int = 0) -> Figures:
    shadow = {"compared": float(compared), "agreed": float(compared if agreed is None else agreed),
              "errors": float(shadow_errors), "diff_sum": 0.0, "diff_max": 0.0}
    return Figures(candidate or VersionFigures(), baseline or version(1000), shadow, 1)


def observe(fig: Figures | None, routing: dict[int, int] | None) -> Observation:
    return Observation({"i1": {"versions": {}, "shadow": {}}}, fig, routing)


def run(d: RolloutDocument, fig: Figures | None, at: float, routing: dict[int, int] | None = None,
        *, write: bool = True) -> tuple[RolloutDocument, list[Any]]:
    """One round; ``write``: the weights of a final phase were written (as the controller says)."""
    routing = routing if routing is not None else d.weights_for(d.current_step)
    d, actions = step(d, observe(fig, routing), T0 + timedelta(seconds=at))
    return settle(d, actions) if write else d, actions


def settle(d: RolloutDocument, actions: list[Any]) -> RolloutDocument:
    if any(isinstance(a, SetWeights) and a.then is not None for a in actions):
        return written(d)
    return d


def test_pending_enters_shadow_with_all_traffic_on_the_baseline() -> None:
    d, actions = step(doc(), observe(None, {2: 100}), T0)
    assert d.state.phase is Phase.RUNNING and d.state.step == 0 and d.state.step_started == T0
    assert actions == [SetWeights({2: 100, 3: 0})]
    assert d.state.window_start == {"i1": {"versions": {}, "shadow": {}}}


def test_good_candidate_walks_every_step_to_promotion() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    at = 0.0
    seen: list[dict[int, int]] = []
    while not d.state.phase.final:
        at += 11
        fig = figures(version(500), version(500), compared=500)
        d, actions = run(d, fig, at)
        seen.extend(a.weights for a in actions if isinstance(a, SetWeights))
    assert d.state.phase is Phase.PROMOTED
    # The 100 % step is entered (its weights written), judged, then the promotion writes them again.
    assert seen == [{2: 95, 3: 5}, {2: 75, 3: 25}, {2: 50, 3: 50}, {2: 0, 3: 100}, {2: 0, 3: 100}]
    assert [x.verdict for x in d.state.decisions] == [Verdict.PASS] * 5
    assert [x.step for x in d.state.decisions] == [0, 1, 2, 3, 4]
    assert "100 % step passed" in d.state.reason


def test_a_step_is_not_passed_before_its_interval() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    same, actions = run(d, figures(compared=1000), 9.0)
    assert same == d and actions == []


def test_shadow_errors_roll_back_at_once_with_the_reason() -> None:
    d, _ = step(doc(webhooks={"on_rollback": {"url": "http://127.0.0.1:1/hook"}}), observe(None, {2: 100}), T0)
    d, actions = run(d, figures(compared=30, shadow_errors=10), 1.0)
    assert d.state.phase is Phase.ROLLED_BACK
    assert "error rate" in d.state.reason and "step 0 (shadow)" in d.state.reason
    assert actions[0] == SetWeights({2: 100, 3: 0}, then=Phase.ROLLED_BACK)
    assert isinstance(actions[1], CallWebhook) and actions[1].kind == "on_rollback"
    assert d.state.decisions[-1].verdict is Verdict.FAIL
    assert d.state.decisions[-1].figures["shadow_candidate_errors"] == 10


def test_errors_under_the_allowance_of_min_requests_do_not_fail_early() -> None:
    # 0.5 % of min_requests 100 allows 0 errors: 1 error fails; with 1000 requests, 5 are allowed.
    d, _ = step(doc(gates={"min_requests": 1000}), observe(None, {2: 100}), T0)
    d = d.model_copy(update={"state": d.state.model_copy(update={"step": 1})})
    held, _ = run(d, figures(version(995, {"INTERNAL": 4})), 1.0)
    assert held.state.phase is Phase.RUNNING
    failed, _ = run(d, figures(version(10, {"INTERNAL": 6})), 1.0)
    assert failed.state.phase is Phase.ROLLED_BACK and "INTERNAL: 6" in failed.state.reason


def test_disagreement_stops_the_rollout_in_shadow() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d, actions = run(d, figures(compared=200, agreed=150), 2.0)
    assert d.state.phase is Phase.ROLLED_BACK and "agreement 75.00%" in d.state.reason
    assert actions == [SetWeights({2: 100, 3: 0}, then=Phase.ROLLED_BACK)]


def test_too_little_traffic_holds_inconclusive_once_per_interval() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d, actions = run(d, figures(compared=20), 11.0)
    assert d.state.phase is Phase.RUNNING and d.state.step == 0 and actions == []
    assert d.state.decisions[-1].verdict is Verdict.INCONCLUSIVE
    assert "only 20 shadow comparisons" in d.state.decisions[-1].reason
    again, _ = run(d, figures(compared=30), 15.0)
    assert again.state.decisions == d.state.decisions
    later, _ = run(d, figures(compared=30), 22.0)
    assert len(later.state.decisions) == 2
    passed, _ = run(later, figures(compared=150), 23.0)
    assert passed.state.step == 1


def test_p99_ratio_gate_fails_a_slow_candidate() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d = d.model_copy(update={"state": d.state.model_copy(update={"step": 2})})
    d, _ = run(d, figures(version(500, p99_bucket="0.05"), version(500, p99_bucket="0.005")), 11.0)
    assert d.state.phase is Phase.ROLLED_BACK and "p99 latency" in d.state.reason


def test_hand_written_weights_pause_the_rollout() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d, _ = run(d, figures(compared=10), 1.0, routing={2: 50, 3: 50})
    assert d.state.phase is Phase.PAUSED and "changed by hand" in d.state.reason
    assert "2=50 3=50" in d.state.reason
    # The same share in other numbers is not a change.
    d2, _ = step(doc(), observe(None, {2: 100}), T0)
    same, _ = run(d2, figures(compared=10), 1.0, routing={2: 7, 3: 0})
    assert same.state.phase is Phase.RUNNING


def test_resume_restarts_the_window_and_writes_the_weights_again() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d, _ = run(d, None, 1.0, routing={2: 50, 3: 50})
    d = d.model_copy(update={"state": d.state.model_copy(update={"request": "resume"})})
    resumed, actions = run(d, None, 5.0, routing={2: 50, 3: 50})
    assert resumed.state.phase is Phase.RUNNING and resumed.state.step_started == T0 + timedelta(seconds=5)
    assert actions == [SetWeights({2: 100, 3: 0})] and resumed.state.request is None


@pytest.mark.parametrize("request_", ["abort", "pause"])
def test_operator_requests(request_: str) -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d = d.model_copy(update={"state": d.state.model_copy(update={"request": request_, "request_reason": "why"})})
    d, actions = run(d, None, 1.0)
    assert d.state.request is None and "(why)" in d.state.reason
    if request_ == "abort":
        assert d.state.phase is Phase.ABORTED and actions == [SetWeights({2: 100, 3: 0}, then=Phase.ABORTED)]
    else:
        assert d.state.phase is Phase.PAUSED and actions == []


def test_before_promotion_webhook_gates_the_last_step() -> None:
    d = doc(steps=["shadow", 100], webhooks={"before_promotion": {"url": "http://127.0.0.1:1/hook"}})
    d, _ = step(d, observe(None, {2: 100}), T0)
    d, actions = run(d, figures(compared=200), 11.0)
    assert d.state.phase is Phase.PROMOTING
    assert isinstance(actions[0], CallWebhook) and actions[0].payload["decision"]["verdict"] == "pass"
    refused, more = after_webhook(d, False, "HTTP 409", T0, observe(None, None))
    assert refused.state.phase is Phase.PAUSED and "HTTP 409" in refused.state.reason and more == []
    done, more = after_webhook(d, True, "HTTP 200", T0, observe(None, None))
    # Allowed: the 100 % step starts; it is judged before the promotion.
    assert done.state.phase is Phase.RUNNING and done.state.step == 1 and done.state.finishing is None
    assert more == [SetWeights({2: 0, 3: 100})]


def _asking(d: RolloutDocument, request: str) -> RolloutDocument:
    return d.model_copy(update={"state": d.state.model_copy(update={"request": request})})


def test_a_refused_operator_promotion_does_not_skip_judging_a_later_one() -> None:
    d = doc(steps=["shadow", 100], webhooks={"before_promotion": {"url": "http://127.0.0.1:1/hook"}})
    d, _ = step(d, observe(None, {2: 100}), T0)
    d, actions = run(_asking(d, "promote"), None, 1.0)
    assert d.state.phase is Phase.PROMOTING and d.state.operator_promote and isinstance(actions[0], CallWebhook)
    refused, _ = after_webhook(d, False, "HTTP 409", T0, observe(None, None))
    assert refused.state.phase is Phase.PAUSED and not refused.state.operator_promote
    resumed, _ = run(_asking(refused, "resume"), None, 2.0)
    assert resumed.state.phase is Phase.RUNNING
    earned, _ = run(resumed, figures(compared=200), 13.0)
    assert earned.state.phase is Phase.PROMOTING and not earned.state.operator_promote
    # The gates earned this promotion: the 100 % step is judged, not skipped as an operator's.
    done, more = after_webhook(earned, True, "HTTP 200", T0, observe(None, None))
    assert done.state.phase is Phase.RUNNING and done.state.step == 1 and "judged" in done.state.reason
    assert more == [SetWeights({2: 0, 3: 100})]


def test_a_stale_operator_promotion_flag_is_dropped_outside_promoting() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    paused = d.model_copy(update={"state": d.state.model_copy(update={"phase": Phase.PAUSED,
                                                                      "operator_promote": True})})
    resumed, _ = run(_asking(paused, "resume"), None, 2.0)
    assert resumed.state.phase is Phase.RUNNING and not resumed.state.operator_promote


def test_no_figures_holds_and_says_why() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    obs = Observation({}, None, {2: 100, 3: 0}, ("i1: ConnectionRefusedError",))
    d, actions = step(d, obs, T0 + timedelta(seconds=11))
    assert actions == [] and d.state.decisions[-1].verdict is Verdict.INCONCLUSIVE
    assert "ConnectionRefusedError" in d.state.decisions[-1].reason


def test_judge_reports_every_gate_figure() -> None:
    judged = judge(doc(), figures(version(300), version(700), compared=300), shadow_step=False)
    assert judged.verdict is Verdict.PASS
    assert set(judged.figures["gates"]) == {"error_rate", "agreement", "p99_ratio"}
    assert judged.figures["gates"]["p99_ratio"]["figure"] == pytest.approx(1.0)


def test_p99_within_the_slack_passes_whatever_the_ratio() -> None:
    d, _ = step(doc(gates={"min_requests": 100, "p99_slack_ms": 100}), observe(None, {2: 100}), T0)
    d = d.model_copy(update={"state": d.state.model_copy(update={"step": 2})})
    d, _ = run(d, figures(version(500, p99_bucket="0.05"), version(500, p99_bucket="0.005")), 11.0)
    assert d.state.phase is Phase.RUNNING and d.state.step == 3


def test_a_final_phase_waits_for_its_weights_and_retries_them() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    going, actions = run(d, figures(compared=200, agreed=150), 2.0, write=False)
    assert going.state.phase is Phase.RUNNING and going.state.finishing is Phase.ROLLED_BACK
    assert actions == [SetWeights({2: 100, 3: 0}, then=Phase.ROLLED_BACK)]
    # The write conflicted: not rolled back yet, and the status says why.
    stuck = not_written(going, "the routing changed (revision 7)")
    assert stuck.state.phase is Phase.RUNNING and "retrying next round" in stuck.state.reason
    assert "agreement 75.00%" in stuck.state.reason
    # The next round writes the same weights again, whatever the figures or routing say now.
    again, actions = run(stuck, figures(compared=1000), 30.0, routing={2: 50, 3: 50}, write=False)
    assert again.state.phase is Phase.RUNNING and actions == [SetWeights({2: 100, 3: 0}, then=Phase.ROLLED_BACK)]
    twice = not_written(not_written(again, "e1"), "e2")
    assert twice.state.reason.count("retrying") == 1 and "(e2)" in twice.state.reason
    done = written(twice)
    assert done.state.phase is Phase.ROLLED_BACK and done.state.finishing is None
    assert "retrying" not in done.state.reason and "agreement 75.00%" in done.state.reason


def test_an_abort_replaces_a_promotion_whose_weights_are_not_written() -> None:
    d = doc(steps=["shadow", 100])
    d, _ = step(d, observe(None, {2: 100}), T0)
    d, actions = run(d, figures(compared=200), 11.0, write=False)
    assert d.state.step == 1 and actions == [SetWeights({2: 0, 3: 100})]
    going, actions = run(d, figures(version(500), VersionFigures()), 22.0, write=False)
    assert going.state.finishing is Phase.PROMOTED and actions == [SetWeights({2: 0, 3: 100}, then=Phase.PROMOTED)]
    going = going.model_copy(update={"state": going.state.model_copy(update={"request": "abort"})})
    aborted, actions = run(going, None, 12.0, write=False)
    assert aborted.state.finishing is Phase.ABORTED and actions == [SetWeights({2: 100, 3: 0}, then=Phase.ABORTED)]


def test_rollback_restores_the_weights_at_the_start_with_the_candidate_at_0() -> None:
    d = doc(start_weights={"1": 20, "2": 80, "3": 0})
    d, _ = step(d, observe(None, {1: 20, 2: 80}), T0)
    d, actions = run(d, figures(compared=200, agreed=150), 2.0)
    assert d.state.phase is Phase.ROLLED_BACK
    assert actions == [SetWeights({1: 20, 2: 80, 3: 0}, then=Phase.ROLLED_BACK)]
    # Nothing recorded, or only the candidate weighted: the baseline takes all.
    assert doc().restored_weights() == {2: 100, 3: 0}
    assert doc(start_weights={"3": 100, "1": 0}).restored_weights() == {2: 100, 3: 0}


def test_instances_joining_the_window_are_taken_into_its_start() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d = d.model_copy(update={"state": d.state.model_copy(update={"step": 1})})
    late = {"versions": {"3": {"codes": {"OK": 5000.0}, "buckets": {}}}, "shadow": {}}
    obs = Observation({"i1": {"versions": {}, "shadow": {}}, "i2": late}, figures(version(10)), {2: 95, 3: 5},
                      joined={"i2": late})
    held, _ = step(d, obs, T0 + timedelta(seconds=1))
    assert held.state.window_start["i2"] == late and "i1" in held.state.window_start


def test_steps_move_weight_only_between_baseline_and_candidate() -> None:
    # Version 1 keeps its 10 % at every step; 2 and 3 share the other 90 %.
    d, actions = step(doc(start_weights={"1": 10, "2": 90}), observe(None, {1: 10, 2: 90}), T0)
    assert actions == [SetWeights({1: 10, 2: 90, 3: 0})]
    at, seen = 0.0, list[dict[int, int]]()
    while not d.state.phase.final:
        at += 11
        d, actions = run(d, figures(version(500), version(500), compared=500), at)
        seen.extend(a.weights for a in actions if isinstance(a, SetWeights))
    shares = [{v: round(100 * w / sum(weights.values()), 3) for v, w in weights.items()} for weights in seen]
    assert shares == [{1: 10, 2: 85.5, 3: 4.5}, {1: 10, 2: 67.5, 3: 22.5}, {1: 10, 2: 45, 3: 45},
                      {1: 10, 2: 0, 3: 90}, {1: 10, 2: 0, 3: 90}]
    assert d.state.phase is Phase.PROMOTED  # no step saw its own weights as a manual change


def test_the_100_percent_step_is_judged_before_the_promotion() -> None:
    d = doc(steps=[50, 100], start_weights={"1": 20, "2": 80})
    d, _ = step(d, observe(None, {1: 20, 2: 80}), T0)
    d, _ = run(d, figures(version(500), version(500, p99_bucket="0.005")), 11.0)
    assert d.state.phase is Phase.RUNNING and d.state.step == 1 and "judged before the promotion" in d.state.reason
    assert d.state.reference is not None and d.state.reference["p99_ms"] == pytest.approx(4.96)
    # In the 100 % step the baseline has no callers: the p99 is held to the window before.
    alone = VersionFigures()
    held, _ = run(d, figures(version(50), alone), 22.0)
    assert held.state.phase is Phase.RUNNING and held.state.decisions[-1].verdict is Verdict.INCONCLUSIVE
    slow, actions = run(d, figures(version(500, p99_bucket="0.05"), alone), 22.0)
    assert slow.state.phase is Phase.ROLLED_BACK and "(window before)" in slow.state.reason
    assert actions[0] == SetWeights({1: 20, 2: 80, 3: 0}, then=Phase.ROLLED_BACK)
    failing, _ = run(d, figures(version(400, {"INTERNAL": 100}), alone), 12.0)
    assert failing.state.phase is Phase.ROLLED_BACK and "step 1 (100)" in failing.state.reason
    early, actions = run(d, figures(version(500), alone), 15.0)
    assert early == d and actions == []  # held for the step's whole interval
    good, actions = run(d, figures(version(500), alone), 22.0)
    assert good.state.phase is Phase.PROMOTED and actions == [SetWeights({1: 20, 2: 0, 3: 80}, then=Phase.PROMOTED)]
    assert good.state.decisions[-1].figures["p99_baseline_from"] == "the window before"


def test_an_operator_promotion_ends_the_rollout_without_judging_the_100_percent_step() -> None:
    d, _ = step(doc(), observe(None, {2: 100}), T0)
    d = d.model_copy(update={"state": d.state.model_copy(update={"request": "promote"})})
    d, actions = run(d, None, 1.0)
    assert d.state.phase is Phase.PROMOTED and "promoted by an operator" in d.state.reason
    assert actions == [SetWeights({2: 0, 3: 100}, then=Phase.PROMOTED)] and not d.state.operator_promote


def _promql_doc(**gate: Any) -> RolloutDocument:
    spec = {"name": "latency", "query": 'max(lat{model="{{model}}",version="{{candidate}}"}[{{interval}}])',
            "comparison": "<", "threshold": 0.25, **gate}
    d, _ = step(doc(gates={"min_requests": 100, "promql": [spec]}), observe(None, {2: 100}), T0)
    return d.model_copy(update={"state": d.state.model_copy(update={"step": 1})})


def _with_promql(result: PromQLResult | None) -> Observation:
    return Observation({"i1": {"versions": {}, "shadow": {}}}, figures(version(500), version(500)), {2: 95, 3: 5},
                       promql=None if result is None else {"latency": result})


@pytest.mark.parametrize(("result", "words"), [
    (PromQLResult("q"), "an empty result"),
    (PromQLResult("q", series=2), "2 series, all NaN"),
    (PromQLResult("q", error="no answer within 5s"), "no answer within 5s"),
    (None, "not asked yet"),
])
def test_a_promql_gate_without_a_figure_holds_and_never_aborts(result: PromQLResult | None, words: str) -> None:
    d = _promql_doc()
    held, actions = step(d, _with_promql(result), T0 + timedelta(seconds=11))
    assert held.state.phase is Phase.RUNNING and held.state.step == 1 and actions == []
    last = held.state.decisions[-1]
    assert last.verdict is Verdict.INCONCLUSIVE and words in last.reason and words in held.state.reason
    assert last.figures["gates"]["promql_latency"]["verdict"] == "inconclusive"


def test_a_promql_gate_passes_or_fails_on_every_series() -> None:
    d = _promql_doc()
    passed, _ = step(d, _with_promql(PromQLResult("q", (0.1, 0.2), series=2)), T0 + timedelta(seconds=11))
    assert passed.state.step == 2 and passed.state.decisions[-1].figures["gates"]["promql_latency"]["figure"] == 0.1
    failed, _ = step(d, _with_promql(PromQLResult("q", (0.1, 0.3), series=2)), T0 + timedelta(seconds=11))
    assert failed.state.finishing is Phase.ROLLED_BACK
    assert "PromQL gate 'latency': 0.3 is not < 0.25 (1 of 2 series)" in failed.state.reason
    # Not in the shadow step unless asked: the candidate has no callers there.
    shadow, _ = step(doc(gates={"min_requests": 100, "promql": [{"name": "x", "query": "up", "threshold": 1}]}),
                     observe(None, {2: 100}), T0)
    moved, _ = step(shadow, observe(figures(compared=500), {2: 100, 3: 0}), T0 + timedelta(seconds=11))
    assert moved.state.step == 1 and "promql_x" not in moved.state.decisions[-1].figures["gates"]
