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
import io
import math
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mesh.tls_files import ReloadingContext, read_ca, read_key_pair

SCRAPE_MAX_BYTES = 8 * 1024 * 1024
"""A service's /metrics is a few kB per model version; more is refused unread."""
SCRAPE_TOTAL_TIMEOUTS = 4
"""An instance's whole scrape (connect, handshake, request, every read) ends within this many
scrape timeouts: a server dripping bytes keeps no thread busy past it."""
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


class ScrapeTls(ReloadingContext):
    """The scrape's SSL context, made again when its files change (cert-manager renews the scrape
    Secret and the CA in place): mesh.tls_files' :class:`~mesh.tls_files.ReloadingContext`, looked
    at once per ``interval`` at most, a broken renewal keeps the old context and is logged once as
    ``scrape_tls_reload_refused``."""

    def __init__(self, ca: Path, cert: Path | None, key: Path | None, interval: float = 1.0) -> None:
        self.ca, self.cert, self.key = ca, cert, key
        super().__init__(tuple(path for path in (ca, cert, key) if path is not None), self._checked_context,
                         interval=interval, events=("scrape_tls_reloaded", "scrape_tls_reload_refused"))

    def _checked_context(self) -> ssl.SSLContext:
        """A context from the files now; TlsFileError (naming the flag) or ssl.SSLError if unusable."""
        context = ssl.create_default_context(cadata=read_ca(self.ca, "--metrics-ca").decode("ascii", errors="replace"))
        if self.cert is not None and self.key is not None:
            read_key_pair(self.cert, self.key, "--metrics-cert", "--metrics-key")
            context.load_cert_chain(self.cert, self.key)
        return context


def scrape_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ScrapeTls | None:
    """The context to scrape services whose admin port requires the admin identity: their
    certificates checked against ``ca``, ``cert``/``key`` presented, made again when the files are
    renewed; None (plain HTTP) when none is given. ValueError (TlsFileError) names a bad flag."""
    if ca is None and cert is None and key is None:
        return None
    if ca is None:
        raise ValueError("--metrics-cert/--metrics-key need --metrics-ca (the CA that signed the services' "
                         "certificates)")
    if (cert is None) != (key is None):
        raise ValueError("--metrics-cert and --metrics-key go together: give both or neither")
    return ScrapeTls(ca, cert, key)


TlsSource = ssl.SSLContext | Callable[[], ssl.SSLContext] | None
"""How a scrape speaks TLS: a fixed context, a function giving the context now (:class:`ScrapeTls`),
or None (plain HTTP)."""


class ScrapeError(ValueError):
    """An instance's /metrics could not be read; the message says what happened."""


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the scrape's deadline passed")
    return left


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes for http.client, each read waiting at most the per-operation timeout and
    never past the scrape's deadline (a server dripping a byte at a time is cut off at it)."""

    def __init__(self, sock: socket.socket, timeout: float, deadline: float) -> None:
        super().__init__()
        self.sock, self.timeout, self.deadline = sock, timeout, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.sock.settimeout(min(self.timeout, _remaining(self.deadline)))
        return self.sock.recv_into(buffer)


class _DeadlineSocket:
    """What http.client needs of a socket (sendall, makefile, close), bound by the deadline."""

    def __init__(self, sock: socket.socket, timeout: float, deadline: float) -> None:
        self.sock, self.timeout, self.deadline = sock, timeout, deadline

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(min(self.timeout, _remaining(self.deadline)))
        self.sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self.sock, self.timeout, self.deadline))

    def close(self) -> None:
        """Nothing: http.client closes its socket before the body is read (a response that closes
        the connection); :func:`_fetch` closes the real one when done."""


def _handshake(sock: socket.socket, tls: ssl.SSLContext, server_name: str, timeout: float,
               deadline: float) -> ssl.SSLSocket:
    """The TLS handshake, each wait at most ``timeout`` and all of it before ``deadline``."""
    wrapped = tls.wrap_socket(sock, server_hostname=server_name, do_handshake_on_connect=False)
    try:
        wrapped.setblocking(False)
        while True:
            try:
                wrapped.do_handshake()
                return wrapped
            except ssl.SSLWantReadError:
                readable: list[ssl.SSLSocket] = [wrapped]
                writable: list[ssl.SSLSocket] = []
            except ssl.SSLWantWriteError:
                readable, writable = [], [wrapped]
            wait = min(timeout, _remaining(deadline))
            if not any(select.select(readable, writable, [], wait)[:2]):
                raise TimeoutError("the TLS handshake stalled")
    except BaseException:
        wrapped.close()
        raise


def _fetch(address: str, timeout: float, tls: TlsSource, server_name: str | None, total: float) -> str:
    """``GET /metrics`` of ``address`` (host:port), over HTTPS with ``tls``; every socket operation
    (connect, handshake, each read) waits at most ``timeout`` seconds, and all of them together
    at most ``total`` (TimeoutError past either)."""
    deadline = time.monotonic() + total
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = tls() if callable(tls) else tls
    sock = socket.create_connection((host, int(port)), timeout=min(timeout, total))
    try:
        if context is not None:
            try:
                sock = _handshake(sock, context, server_name or host, timeout, deadline)
            except ssl.SSLCertVerificationError as exc:
                raise ScrapeError(f"TLS: {exc.verify_message or exc} (--metrics-ca, --metrics-server-name)") from exc
            except ssl.SSLError as exc:
                raise ScrapeError(f"TLS handshake failed: {exc.reason or exc}") from exc
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        connection.sock = _DeadlineSocket(sock, timeout, deadline)
        try:
            connection.request("GET", "/metrics", headers={"Accept": "text/plain"})
            response = connection.getresponse()
            data: bytes = response.read(SCRAPE_MAX_BYTES + 1)
        except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
            # TLS 1.3: a refused client certificate shows as an alert on the first read.
            hint = ("" if context is not None
                    else " (an HTTPS admin port? give --metrics-ca/--metrics-cert/--metrics-key)")
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
                 timeout: float = 2.0, tls: TlsSource = None,
                 server_name: str | None = None) -> tuple[dict[str, Counters], dict[str, str]]:
    """Scrape ``instance id → metrics address`` at once (HTTPS with ``tls``, the services'
    certificates checked for ``server_name``, else the address's host); returns (counters,
    problems) by instance. Each socket operation waits at most ``timeout``, an instance's whole
    scrape at most :data:`SCRAPE_TOTAL_TIMEOUTS` times that (a slow drip is cut off)."""
    total = SCRAPE_TOTAL_TIMEOUTS * timeout

    async def one(address: str) -> Counters:
        text = await asyncio.to_thread(_fetch, address, timeout, tls, server_name, total)
        return parse_metrics(text, model, baseline, candidate)

    items = sorted(targets.items())
    results = await asyncio.gather(*(one(address) for _, address in items), return_exceptions=True)
    counters: dict[str, Counters] = {}
    problems: dict[str, str] = {}
    for (instance, address), result in zip(items, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, TimeoutError):
                problems[instance] = f"{address}: no answer within {timeout:g}s (or {total:g}s in all)"
                continue
            if not isinstance(result, (OSError, ValueError, http.client.HTTPException)):
                raise result
            problems[instance] = f"{address}: {type(result).__name__}: {result}"[:300]
        else:
            counters[instance] = result
    return counters, problems
