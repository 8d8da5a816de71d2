"""Per-version figures of one model from the services' own ``/metrics``, over one window.

Each scrape gives cumulative counters per instance; a step's figures are the difference between
now and the counters when the step began (kept in the rollout document, so a restarted
controller judges the same window). An instance whose counters went backwards restarted: its
current counts are all new. Pure functions except :func:`scrape`, which reads HTTPS with a client
certificate (:func:`scrape_tls`) where the services' admin ports require the admin identity.
"""

from __future__ import annotations

import asyncio
import http.client
import math
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mesh.tls_files import read_ca, read_key_pair

SCRAPE_MAX_BYTES = 8 * 1024 * 1024
"""A service's /metrics is a few kB per model version; more is refused unread."""
NOT_ERRORS = frozenset({"OK", "CANCELLED"})
"""gRPC codes that do not count against a version: success, and callers that gave up."""
SHADOW_FIELDS = ("compared", "agreed", "errors", "diff_sum")

# One instance's counters, JSON-friendly (stored in the rollout document as the window start):
# {"versions": {"<version>": {"codes": {code: n}, "buckets": {le: cumulative n}}},
#  "shadow": {"compared": n, "agreed": n, "errors": n, "diff_sum": x, "diff_max": x}}
Counters = dict[str, Any]


def parse_metrics(text: str, model: str, baseline: int, candidate: int) -> Counters:
    """The counters of ``model``'s two versions (and their shadow comparison) in one scrape."""
    wanted = {str(baseline), str(candidate)}
    versions: dict[str, dict[str, dict[str, float]]] = {}
    shadow: dict[str, float] = {}
    pair = {"model": model, "baseline": str(baseline), "candidate": str(candidate)}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != model:
                continue
            if sample.name == "sluice_requests_total" and labels.get("version") in wanted:
                entry = versions.setdefault(labels["version"], {"codes": {}, "buckets": {}})
                entry["codes"][labels.get("code", "UNKNOWN")] = sample.value
            elif (sample.name == "sluice_request_duration_seconds_bucket" and labels.get("phase") == "total"
                  and labels.get("version") in wanted):
                entry = versions.setdefault(labels["version"], {"codes": {}, "buckets": {}})
                entry["buckets"][labels["le"]] = sample.value
            elif sample.name.startswith("sluice_shadow_") and all(labels.get(k) == v for k, v in pair.items()):
                name = sample.name.removeprefix("sluice_shadow_").removesuffix("_total")
                if name in (*SHADOW_FIELDS, "diff_max"):
                    shadow[name] = sample.value
    return {"versions": versions, "shadow": shadow}


def _minus(now: Mapping[str, float], then: Mapping[str, float]) -> tuple[dict[str, float], bool]:
    """``now - then`` per key; the flag says a counter went backwards (the process restarted)."""
    reset = any(now.get(k, 0.0) < v for k, v in then.items())
    if reset:
        return dict(now), True
    return {k: v - then.get(k, 0.0) for k, v in now.items()}, False


@dataclass(frozen=True)
class VersionFigures:
    requests: int = 0
    codes: Mapping[str, int] = field(default_factory=dict)
    buckets: Mapping[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code not in NOT_ERRORS)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def quantile(self, q: float) -> float | None:
        """Seconds, interpolated inside the bucket as Prometheus' histogram_quantile does."""
        return bucket_quantile(q, self.buckets)


def bucket_quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    bounds = sorted(((math.inf if le == "+Inf" else float(le)), n) for le, n in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: its bound is all that is known
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = upper, count
    return lower


@dataclass(frozen=True)
class Figures:
    """Candidate vs baseline over one window, summed over every instance."""

    candidate: VersionFigures
    baseline: VersionFigures
    shadow: Mapping[str, float]
    instances: int
    restarted: tuple[str, ...] = ()
    """Instances whose counters went backwards in the window (counted from their restart)."""

    @property
    def shadow_compared(self) -> int:
        return int(self.shadow.get("compared", 0))

    @property
    def shadow_agreed(self) -> int:
        return int(self.shadow.get("agreed", 0))

    @property
    def shadow_errors(self) -> int:
        return int(self.shadow.get("errors", 0))


def _version(entries: Iterable[Mapping[str, Any]]) -> VersionFigures:
    codes: dict[str, int] = {}
    buckets: dict[str, float] = {}
    for entry in entries:
        for code, n in entry.get("codes", {}).items():
            codes[code] = codes.get(code, 0) + round(n)
        for le, n in entry.get("buckets", {}).items():
            buckets[le] = buckets.get(le, 0.0) + n
    return VersionFigures(sum(codes.values()), codes, buckets)


def window(start: Mapping[str, Counters], now: Mapping[str, Counters], baseline: int, candidate: int) -> Figures:
    """The figures between two sets of per-instance counters (instance id → :data:`Counters`)."""
    per_version: dict[str, list[dict[str, Any]]] = {str(baseline): [], str(candidate): []}
    shadow: dict[str, float] = {name: 0.0 for name in SHADOW_FIELDS}
    shadow["diff_max"] = 0.0
    restarted: list[str] = []
    for instance, counters in sorted(now.items()):
        before = start.get(instance, {})
        reset = False
        for version, entry in counters.get("versions", {}).items():
            then = before.get("versions", {}).get(version, {})
            codes, r1 = _minus(entry.get("codes", {}), then.get("codes", {}))
            buckets, r2 = _minus(entry.get("buckets", {}), then.get("buckets", {}))
            reset = reset or r1 or r2
            if version in per_version:
                per_version[version].append({"codes": codes, "buckets": buckets})
        then_shadow = {k: v for k, v in before.get("shadow", {}).items() if k in SHADOW_FIELDS}
        delta, r3 = _minus({k: v for k, v in counters.get("shadow", {}).items() if k in SHADOW_FIELDS}, then_shadow)
        reset = reset or r3
        for name in SHADOW_FIELDS:
            shadow[name] += delta.get(name, 0.0)
        shadow["diff_max"] = max(shadow["diff_max"], float(counters.get("shadow", {}).get("diff_max", 0.0)))
        if reset:
            restarted.append(instance)
    return Figures(_version(per_version[str(candidate)]), _version(per_version[str(baseline)]), shadow,
                   len(now), tuple(restarted))


def joined(start: Mapping[str, Counters], now: Mapping[str, Counters], started: Mapping[str, datetime],
           step_started: datetime | None) -> dict[str, Counters]:
    """The window start of every instance in ``now`` missing from ``start``: an instance that
    started serving after the step began counts from zero (everything it did is in the window);
    one that was serving before (not scraped at the step's start) counts from its counters now, so
    it is judged from the next round on, not on its whole history."""
    out: dict[str, Counters] = {}
    for instance, counters in now.items():
        if instance in start:
            continue
        began = started.get(instance)
        fresh = step_started is not None and began is not None and began >= step_started
        out[instance] = {"versions": {}, "shadow": {}} if fresh else counters
    return out


def metrics_address(address: str, admin_address: str | None) -> str:
    """Where an instance serves /metrics: its record's ``admin_address``, else the gRPC port + 1
    (the service's default, ``--metrics-port``)."""
    if admin_address:
        return admin_address
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + 1}"


def scrape_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The context to scrape services whose admin port requires the admin identity: their
    certificates checked against ``ca``, ``cert``/``key`` presented; None (plain HTTP) when none is
    given. ValueError (TlsFileError) names a bad flag."""
    if ca is None and cert is None and key is None:
        return None
    if ca is None:
        raise ValueError("--metrics-cert/--metrics-key need --metrics-ca (the CA that signed the services' "
                         "certificates)")
    if (cert is None) != (key is None):
        raise ValueError("--metrics-cert and --metrics-key go together: give both or neither")
    context = ssl.create_default_context(cadata=read_ca(ca, "--metrics-ca").decode("ascii", errors="replace"))
    if cert is not None and key is not None:
        read_key_pair(cert, key, "--metrics-cert", "--metrics-key")
        context.load_cert_chain(cert, key)
    return context


class ScrapeError(ValueError):
    """An instance's /metrics could not be read; the message says what happened."""


def _fetch(address: str, timeout: float, tls: ssl.SSLContext | None, server_name: str | None) -> str:
    """``GET /metrics`` of ``address`` (host:port), over HTTPS with ``tls``; every socket operation
    (connect, handshake, each read) waits at most ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_name or host)
            except ssl.SSLCertVerificationError as exc:
                raise ScrapeError(f"TLS: {exc.verify_message or exc} (--metrics-ca, --metrics-server-name)") from exc
            except ssl.SSLError as exc:
                raise ScrapeError(f"TLS handshake failed: {exc.reason or exc}") from exc
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        connection.sock = sock
        try:
            connection.request("GET", "/metrics", headers={"Accept": "text/plain"})
            response = connection.getresponse()
            data: bytes = response.read(SCRAPE_MAX_BYTES + 1)
        except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
            # TLS 1.3: a refused client certificate shows as an alert on the first read.
            hint = "" if tls is not None else " (an HTTPS admin port? give --metrics-ca/--metrics-cert/--metrics-key)"
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise ScrapeError(f"connection refused the request: {reason}{hint}") from exc
        finally:
            connection.close()
    finally:
        sock.close()
    if response.status != 200:
        raise ScrapeError(f"/metrics answered HTTP {response.status}")
    if len(data) > SCRAPE_MAX_BYTES:
        raise ScrapeError(f"more than {SCRAPE_MAX_BYTES} bytes")
    return data.decode("utf-8", "replace")


async def scrape(targets: Mapping[str, str], model: str, baseline: int, candidate: int, *,
                 timeout: float = 2.0, tls: ssl.SSLContext | None = None,
                 server_name: str | None = None) -> tuple[dict[str, Counters], dict[str, str]]:
    """Scrape ``instance id → metrics address`` at once (HTTPS with ``tls``, the services'
    certificates checked for ``server_name``, else the address's host); returns (counters,
    problems) by instance. A stalled instance is given up after a few ``timeout``s in all."""

    async def one(address: str) -> Counters:
        # The socket timeout bounds each operation; this bounds them together (a slow drip).
        text = await asyncio.wait_for(asyncio.to_thread(_fetch, address, timeout, tls, server_name), 4 * timeout)
        return parse_metrics(text, model, baseline, candidate)

    items = sorted(targets.items())
    results = await asyncio.gather(*(one(address) for _, address in items), return_exceptions=True)
    counters: dict[str, Counters] = {}
    problems: dict[str, str] = {}
    for (instance, address), result in zip(items, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, TimeoutError):
                problems[instance] = f"{address}: no answer within {timeout:g}s"
                continue
            if not isinstance(result, (OSError, ValueError, http.client.HTTPException)):
                raise result
            problems[instance] = f"{address}: {type(result).__name__}: {result}"[:300]
        else:
            counters[instance] = result
    return counters, problems
