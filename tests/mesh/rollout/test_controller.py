"""Rollouts end to end: real etcd, a registered service with versions 2 and 3, the real
``sluice rollout-controller`` process, load from real gRPC clients; steps of about a second."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import datetime

import onnx
import pytest

from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import parse_routing_document
from mesh.registry.state import build_state, set_weights
from mesh.rollout.controller import RolloutController
from mesh.rollout.document import Phase, parse_rollout_document
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import wait_for
from tests.mesh.conftest import settings_for
from tests.mesh.rollout.conftest import MODEL, Stack, load_on, wait_phase
from tests.mesh.rollout.prometheus import fake_prometheus, vector
from tests.services import models

# Four test sessions share two cores here: a 20 ms scheduling hiccup is not the model's latency.
FAST = ("--interval", "1s", "--min-requests", "20", "--p99-slack", "20ms")

pytestmark = pytest.mark.timeout(180)


def test_good_candidate_goes_from_shadow_to_all_traffic_with_no_failed_request(
        make_stack: Callable[[onnx.ModelProto], Stack]) -> None:
    stack = make_stack(models.doubler_by_adding())
    stack.start_controller("ctl-a")
    with load_on(stack) as load:
        stack.cli("rollout", "start", MODEL, "3", *FAST)
        doc = wait_phase(stack, "promoted", 150)
    assert load.failures == {}
    # Every step passed, the 100 % step (4) included: it is judged before the promotion.
    assert [d["step"] for d in doc["state"]["decisions"] if d["verdict"] == "pass"] == [0, 1, 2, 3, 4]
    # The first interval may pass before the service read the rollout (inconclusive): the pass counts.
    shadow_pass = next(d for d in doc["state"]["decisions"] if d["step"] == 0 and d["verdict"] == "pass")
    assert shadow_pass["figures"]["shadow_compared"] >= 20
    assert stack.weights() == {"2": 0, "3": 100}
    assert load.sent["3"] > 0
    shown = stack.cli("rollout", "status", MODEL).stdout
    assert "promoted" in shown and "version 3 takes all traffic" in shown


def test_candidate_failing_on_some_inputs_is_rolled_back_in_its_first_step(
        make_stack: Callable[[onnx.ModelProto], Stack]) -> None:
    stack = make_stack(models.doubler_failing_above_table())
    stack.start_controller("ctl-a")
    big = float(models.ROLLOUT_TABLE_SIZE + 5)
    with load_on(stack, values=lambda rng: big if rng.random() < 0.2 else 3.0) as load:
        stack.cli("rollout", "start", MODEL, "3", *FAST)
        doc = wait_phase(stack, "rolled_back", 60)
    assert doc["state"]["step"] == 0 and "error rate" in doc["state"]["reason"]
    assert doc["state"]["decisions"][-1]["verdict"] == "fail"
    assert doc["state"]["decisions"][-1]["figures"]["shadow_candidate_errors"] > 0
    assert stack.weights() == {"2": 100, "3": 0}
    assert load.failures == {} and load.sent["3"] == 0  # no caller ever reached the candidate


def test_disagreeing_candidate_is_stopped_in_shadow_before_any_caller_sees_it(
        make_stack: Callable[[onnx.ModelProto], Stack]) -> None:
    stack = make_stack(models.doubler_off_by(0.5))
    stack.start_controller("ctl-a")
    with load_on(stack) as load:
        stack.cli("rollout", "start", MODEL, "3", *FAST)
        doc = wait_phase(stack, "rolled_back", 60)
    assert doc["state"]["step"] == 0 and "agreement" in doc["state"]["reason"]
    assert doc["state"]["decisions"][-1]["figures"]["shadow_mean_abs_diff"] == pytest.approx(0.5)
    assert load.sent["3"] == 0 and load.failures == {}


def test_too_little_traffic_holds_the_step_as_inconclusive(make_stack: Callable[[onnx.ModelProto], Stack]) -> None:
    stack = make_stack(models.doubler_by_adding())
    stack.start_controller("ctl-a")
    stack.cli("rollout", "start", MODEL, "3", "--interval", "0.5s", "--min-requests", "20")
    doc = stack.wait_rollout(lambda d: any(x["verdict"] == "inconclusive" for x in d["state"]["decisions"]),
                             30, "an inconclusive decision")
    assert doc["state"]["phase"] == "running" and doc["state"]["step"] == 0
    assert "only 0 shadow comparisons in the window, 20 needed" in doc["state"]["decisions"][-1]["reason"]
    assert stack.weights() == {"2": 100, "3": 0}
    assert "inconclusive" in stack.cli("rollout", "status", MODEL).stdout


def test_controller_killed_mid_step_is_replaced_and_resumes_the_same_step(
        make_stack: Callable[[onnx.ModelProto], Stack]) -> None:
    stack = make_stack(models.doubler_by_adding())
    first = stack.start_controller("ctl-a")
    standby = stack.start_controller("ctl-b")
    with load_on(stack) as load:
        stack.cli("rollout", "start", MODEL, "3", "--steps", "shadow,50,100", "--interval", "6s",
                  "--min-requests", "20", "--p99-slack", "20ms")
        doc = stack.wait_rollout(lambda d: d["state"]["step"] == 1, 60, "step 1 (50 %)")
        leader = doc["state"]["leader"]
        started = datetime.fromisoformat(doc["state"]["step_started"])
        (first if leader == "ctl-a" else standby).signal(signal.SIGKILL)
        other = "ctl-b" if leader == "ctl-a" else "ctl-a"
        doc = wait_phase(stack, "promoted", 60)
    # The other controller took over within a lease TTL (2 s) and judged the step that was running:
    # its clock was not restarted (that would have put the decision at takeover + 6 s or later).
    assert doc["state"]["leader"] == other
    passed_1 = next(d for d in doc["state"]["decisions"] if d["step"] == 1)
    waited = (datetime.fromisoformat(passed_1["at"]) - started).total_seconds()
    assert passed_1["verdict"] == "pass" and 6.0 <= waited < 7.5
    assert [d["step"] for d in doc["state"]["decisions"] if d["verdict"] == "pass"] == [0, 1, 2]
    assert load.failures == {}


def test_hand_written_weights_pause_the_rollout_until_resumed(
        make_stack: Callable[[onnx.ModelProto], Stack]) -> None:
    stack = make_stack(models.doubler_by_adding())
    stack.start_controller("ctl-a")
    stack.cli("rollout", "start", MODEL, "3", "--interval", "60s")
    wait_phase(stack, "running", 30)
    stack.cli("weights", "set", MODEL, "2=50", "3=50")
    doc = wait_phase(stack, "paused", 30)
    assert "changed by hand" in doc["state"]["reason"]
    wait_for(lambda: stack.weights() == {"2": 50, "3": 50}, 2, "the operator's weights kept")
    stack.cli("rollout", "resume", MODEL)
    wait_phase(stack, "running", 30)
    wait_for(lambda: stack.weights() == {"2": 100, "3": 0}, 10, "the step's weights written again")
    stack.cli("rollout", "abort", MODEL, "--reason", "test over")
    doc = wait_phase(stack, "aborted", 30)
    assert "test over" in doc["state"]["reason"] and stack.weights() == {"2": 100, "3": 0}


async def test_an_abort_whose_weights_conflict_is_not_final_until_a_later_round_writes_them(
        shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    settings = settings_for(shared_etcd, etcd_prefix)
    schema = KeySchema(settings.prefix)
    async with EtcdClient(settings) as client:
        await set_weights(client, schema, MODEL, {1: 10, 2: 90})
        doc = parse_rollout_document({"model": MODEL, "candidate": 3, "baseline": 2,
                                      "start_weights": {"1": 10, "2": 90},
                                      "state": {"phase": "running", "request": "abort"}})
        await client.put(schema.rollout(MODEL), doc.to_json())
        snapshot = await client.get_prefix(schema.models_prefix)
        stale = build_state(schema, snapshot.revision, snapshot.items).model(MODEL)
        kv = await client.get(schema.rollout(MODEL))
        assert kv is not None
        # An operator writes the routing after the controller read it: the abort's write conflicts.
        await set_weights(client, schema, MODEL, {1: 10, 2: 45, 3: 45})
        controller = RolloutController(client, schema, identity="ctl-test")
        await controller._drive(doc, kv, stale)
        stored = await client.get(schema.rollout(MODEL))
        assert stored is not None
        state = parse_rollout_document(stored.value).state
        assert state.phase is Phase.RUNNING and state.finishing is Phase.ABORTED
        assert "retrying next round" in state.reason
        routing = await client.get(schema.routing(MODEL))
        assert routing is not None and parse_routing_document(routing.value).weights == {1: 10, 2: 45, 3: 45}
        # The next round reads the routing again and writes the weights at the start, candidate at 0.
        await controller.round()
        stored = await client.get(schema.rollout(MODEL))
        routing = await client.get(schema.routing(MODEL))
        assert stored is not None and routing is not None
        state = parse_rollout_document(stored.value).state
        assert state.phase is Phase.ABORTED and state.finishing is None and "retrying" not in state.reason
        assert parse_routing_document(routing.value).weights == {1: 10, 2: 90, 3: 0}


def test_a_third_weighted_version_keeps_its_share_through_every_step(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(models.doubler_by_adding(), third=True)
    stack.cli("weights", "set", MODEL, "1=20", "2=80")
    stack.start_controller("ctl-a")
    with load_on(stack) as load:
        stack.cli("rollout", "start", MODEL, "3", "--steps", "shadow,50,100", *FAST)
        doc = wait_phase(stack, "promoted", 150)
    assert load.failures == {} and load.sent["1"] > 0 and load.sent["3"] > 0
    shares = [{v: round(100 * w / sum(seen.values()), 3) for v, w in seen.items() if w} for seen in load.seen]
    assert {"1": 20.0, "2": 40.0, "3": 40.0} in shares  # the 50 % step: half of 2's 80 %
    assert all(share.get("1") == 20.0 for share in shares), shares
    assert {v: round(100 * w / sum(stack.weights().values())) for v, w in stack.weights().items()} == \
        {"1": 20, "2": 0, "3": 80}
    # The 100 % step was judged on its own window before the promotion.
    assert [d["step"] for d in doc["state"]["decisions"] if d["verdict"] == "pass"] == [0, 1, 2]


def test_a_promql_gate_holds_on_an_empty_result_and_rolls_back_on_a_broken_limit(
        make_stack: Callable[..., Stack]) -> None:
    with fake_prometheus() as prometheus:
        stack = make_stack(models.doubler_by_adding(), controller_flags=("--prometheus-url", prometheus.url))
        stack.start_controller("ctl-a")
        query = 'sum(rate(sluice_requests_total{model="{{model}}",version="{{candidate}}",code!="OK"}[{{interval}}]))'
        with load_on(stack) as load:
            stack.cli("rollout", "start", MODEL, "3", "--steps", "50,100", *FAST,
                      "--promql-gate", "errors", query, "<=", "0.01")
            doc = stack.wait_rollout(lambda d: any("an empty result" in x["reason"] for x in d["state"]["decisions"]),
                                     60, "an inconclusive PromQL decision")
            assert doc["state"]["phase"] == "running" and doc["state"]["step"] == 0
            shown = stack.cli("rollout", "status", MODEL).stdout
            assert "promql_errors: - (limit <= 0.01) inconclusive: an empty result" in shown
            prometheus.answer = vector(0.5)
            doc = wait_phase(stack, "rolled_back", 60)
    assert "PromQL gate 'errors': 0.5 is not <= 0.01" in doc["state"]["reason"]
    assert stack.weights() == {"2": 100, "3": 0} and load.failures == {}
    assert 'sum(rate(sluice_requests_total{model="dbl",version="3",code!="OK"}[1s]))' in prometheus.queries
