"""PromQL gates: one instant query against the Prometheus HTTP API (``/api/v1/query``) per gate.

Every outcome is bounded: the answer is read up to :data:`ANSWER_MAX_BYTES`, the call waits at
most its timeout, and an error is kept as one short line. No answer raises out of a gate: a body
nested too deep to parse, a broken HTTP response (too many headers, a cut chunked body) or any
other surprise becomes that gate's error, so one bad Prometheus (or proxy) answer never stops
the controller. An empty result is its own outcome
(the machine holds on it, never aborts nor passes: argo-rollouts#1466).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh.rollout.document import PromQLGate, RolloutDocument

ANSWER_MAX_BYTES = 1024 * 1024
"""A gate's answer is a handful of series; more is refused unread."""
SERIES_KEPT = 5
"""Series values kept in a decision's figures (the verdict is judged on all of them)."""
ERROR_MAX = 300


@dataclass(frozen=True)
class PromQLResult:
    """One gate's query: ``values`` (one per series; empty: no series, or only NaN) or ``error``."""

    query: str
    values: tuple[float, ...] = ()
    error: str | None = None
    series: int = 0
    """Series in the answer (NaN ones included)."""


def _sample(item: Any) -> float:
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise ValueError(f"a sample is [time, \"value\"], got {str(item)[:80]}")
    return float(item[1])  # "NaN", "+Inf" and "-Inf" included


def parse_answer(body: bytes) -> tuple[tuple[float, ...], int]:
    """The values of an instant query's answer (``vector`` or ``scalar``), NaN samples dropped,
    and the number of series in it (NaN ones included; a scalar is one)."""
    try:
        data = json.loads(body)
    except RecursionError:  # C's scanner gives up on deep nesting with this, not a ValueError
        raise ValueError("the answer is nested too deep to be an instant query's") from None
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    if data.get("status") != "success":
        raise ValueError(f"{data.get('errorType', 'error')}: {str(data.get('error', ''))[:200]}")
    result = data.get("data")
    if not isinstance(result, dict):
        raise ValueError("the answer has no data object")
    kind = result.get("resultType")
    if kind == "scalar":
        values = [_sample(result.get("result"))]
    elif kind == "vector":
        series = result.get("result")
        if not isinstance(series, list):
            raise ValueError("a vector answer without a result list")
        values = [_sample(s.get("value") if isinstance(s, dict) else None) for s in series]
    else:
        raise ValueError(f"result type {str(kind)[:20]!r}: a gate needs an instant vector or a scalar")
    return tuple(v for v in values if not math.isnan(v)), len(values)


def _get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # an http(s) URL checked at start
            body: bytes = response.read(ANSWER_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        # Prometheus answers a bad query with 400 and its JSON error body: keep its message.
        body = exc.read(ANSWER_MAX_BYTES + 1)
        if exc.code in (400, 422, 503) and body[:1] == b"{":
            return body
        raise ValueError(f"HTTP {exc.code}") from None
    if len(body) > ANSWER_MAX_BYTES:
        raise ValueError(f"an answer of more than {ANSWER_MAX_BYTES} bytes")
    return body


def _one(base_url: str, query: str, timeout: float) -> PromQLResult:
    url = f"{base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        values, series = parse_answer(_get(url, timeout))
        return PromQLResult(query, values, series=series)
    except TimeoutError:
        return PromQLResult(query, error=f"no answer within {timeout:g}s")
    except (OSError, ValueError, TypeError, AttributeError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return PromQLResult(query, error=f"no answer within {timeout:g}s")
        return PromQLResult(query, error=f"{type(reason).__name__}: {reason}"[:ERROR_MAX])
    except Exception as exc:  # anything else still ends as this gate's error, never the controller's
        return PromQLResult(query, error=f"unexpected {type(exc).__name__}: {exc}"[:ERROR_MAX])


async def evaluate(base_url: str | None, doc: RolloutDocument, gates: Sequence[PromQLGate], *,
                   timeout: float) -> dict[str, PromQLResult]:
    """Every gate's query at once (gate name → result); without a URL each says it was not asked."""
    queries = {g.name: g.render(doc.model, doc.candidate, doc.baseline, doc.interval_s) for g in gates}
    if base_url is None:
        return {name: PromQLResult(query, error="the rollout controller has no --prometheus-url")
                for name, query in queries.items()}

    async def bounded(query: str) -> PromQLResult:
        # The socket timeout bounds each read; this bounds the whole call (a trickling answer).
        try:
            return await asyncio.wait_for(asyncio.to_thread(_one, base_url, query, timeout), timeout)
        except TimeoutError:
            return PromQLResult(query, error=f"no answer within {timeout:g}s")

    results = await asyncio.gather(*(bounded(q) for q in queries.values()))
    return dict(zip(queries, results, strict=True))
