"""PromQL gates against a real HTTP server speaking the Prometheus HTTP API's JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from mesh.errors import InvalidDocumentError
from mesh.rollout.document import RolloutDocument, parse_rollout_document
from mesh.rollout.promql import ANSWER_MAX_BYTES, evaluate
from tests.mesh.rollout.prometheus import FakePrometheus, error, fake_prometheus, scalar, vector

pytestmark = pytest.mark.timeout(30)

QUERY = ('sum(rate(errors{model="{{model}}",version="{{candidate}}"}[{{interval}}])) / '
         'sum(rate(requests{model="{{model}}",version="{{baseline}}"}[{{interval}}]))')


def rollout(*gates: dict[str, object]) -> RolloutDocument:
    return parse_rollout_document({"model": "iris", "candidate": 3, "baseline": 2, "interval_s": 30,
                                   "gates": {"promql": list(gates) or [{"name": "errors", "query": QUERY,
                                                                        "threshold": 0.01}]}})


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    with fake_prometheus() as fake:
        yield fake


async def ask(prometheus: FakePrometheus | None, doc: RolloutDocument | None = None, timeout: float = 2.0
              ) -> tuple[tuple[float, ...], str | None, int]:
    doc = doc or rollout()
    results = await evaluate(prometheus.url if prometheus else None, doc, doc.gates.promql, timeout=timeout)
    got = results["errors"]
    return got.values, got.error, got.series


async def test_the_query_is_templated_and_sent_as_an_instant_query(prometheus: FakePrometheus) -> None:
    prometheus.answer = vector(0.002)
    assert await ask(prometheus) == ((0.002,), None, 1)
    assert prometheus.queries == ['sum(rate(errors{model="iris",version="3"}[30s])) / '
                                  'sum(rate(requests{model="iris",version="2"}[30s]))']


@pytest.mark.parametrize(("answer", "values", "series"), [
    (vector(), (), 0),
    (vector("NaN"), (), 1),
    (vector(0.5, "NaN", 2), (0.5, 2.0), 3),
    (scalar(7.0), (7.0,), 1),
    (vector("+Inf"), (float("inf"),), 1),
])
async def test_answers_give_every_series_value(prometheus: FakePrometheus, answer: dict[str, object],
                                               values: tuple[float, ...], series: int) -> None:
    prometheus.answer = answer
    assert await ask(prometheus) == (values, None, series)


@pytest.mark.parametrize(("setup", "words"), [
    ({"answer": error("parse error at char 5")}, "bad_data: parse error at char 5"),
    ({"raw": b"<html>proxy error</html>", "status": 502}, "HTTP 502"),
    ({"raw": b"not json"}, "JSONDecodeError"),
    ({"raw": json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}).encode()},
     "needs an instant vector or a scalar"),
    ({"raw": b"{" + b" " * ANSWER_MAX_BYTES + b"}"}, f"more than {ANSWER_MAX_BYTES} bytes"),
    ({"delay": 1.5}, "no answer within 0.5s"),
    ({"raw": b"[" * 100_000 + b"]" * 100_000}, "nested too deep"),
    ({"wire": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Many-%d: 1\r\n" % i for i in range(150)) + b"\r\n{}"},
     "more than 100 headers"),
    ({"wire": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"ff\r\n{\"status\": \"succ"}, "IncompleteRead"),
])
async def test_errors_and_timeouts_are_one_bounded_line(prometheus: FakePrometheus, setup: dict[str, object],
                                                        words: str) -> None:
    for name, value in setup.items():
        setattr(prometheus, name, value)
    values, problem, _ = await ask(prometheus, timeout=0.5)
    assert values == () and problem is not None and words in problem and len(problem) <= 300


async def test_unreachable_or_unconfigured_prometheus_is_named() -> None:
    _, problem, _ = await ask(None)
    assert problem == "the rollout controller has no --prometheus-url"
    doc = rollout()
    results = await evaluate("http://127.0.0.1:9", doc, doc.gates.promql, timeout=1.0)
    assert "ConnectionRefusedError" in (results["errors"].error or "")


@pytest.mark.parametrize(("gate", "problem"), [
    ({"name": "x", "query": "up{model='{{modle}}'}", "threshold": 1}, "unknown placeholder {{modle}}"),
    ({"name": "Bad-Name", "query": "up", "threshold": 1}, "is not a gate name"),
    ({"name": "x", "query": "up", "threshold": "nan"}, "finite"),
    ({"name": "x", "query": "up", "threshold": 1, "comparison": "=="}, "comparison"),
    ({"name": "x", "query": "", "threshold": 1}, "query"),
])
def test_invalid_gates_are_named(gate: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidDocumentError) as caught:
        rollout(gate)
    assert problem in str(caught.value)
    with pytest.raises(InvalidDocumentError, match="two PromQL gates are named 'x'"):
        rollout({"name": "x", "query": "up", "threshold": 1}, {"name": "x", "query": "up", "threshold": 2})
