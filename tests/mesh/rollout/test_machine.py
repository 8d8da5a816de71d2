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
    assert seen == [{2: 95, 3: 5}, {2: 75, 3: 25}, {2: 50, 3: 50}, {2: 0, 3: 100}]
    assert [x.verdict for x in d.state.decisions] == [Verdict.PASS] * 4


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
    assert done.state.finishing is Phase.PROMOTED and more == [SetWeights({2: 0, 3: 100}, then=Phase.PROMOTED)]
    assert written(done).state.phase is Phase.PROMOTED


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
    going, actions = run(d, figures(compared=200), 11.0, write=False)
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
