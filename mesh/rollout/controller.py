"""The rollout controller: one leader (an etcd lease on ``rollout-controller/leader``) drives every
rollout document — scrape, :func:`mesh.rollout.machine.step`, act, store — once per tick.

Everything it knows lives in etcd: a controller killed mid-step is replaced (or restarted) and
resumes from the document, with the step's clock and window where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

import structlog

from mesh.errors import ConflictError, EtcdError, InvalidDocumentError, InvalidKeyError, LeaseLostError, MeshError
from mesh.registry.etcd.client import EtcdClient, KeyValue
from mesh.registry.etcd.lease import LeaseKeepAlive
from mesh.registry.keys import KeyKind, KeySchema
from mesh.registry.records import InstanceState
from mesh.registry.state import ModelState, build_state, set_weights
from mesh.rollout import machine
from mesh.rollout.document import SHADOW, RolloutDocument, Webhook, parse_rollout_document
from mesh.rollout.figures import TlsSource, joined, metrics_address, scrape, window
from mesh.rollout.promql import PromQLResult, evaluate

log = structlog.get_logger("mesh.rollout.controller")


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _post(hook: Webhook, payload: dict[str, Any]) -> tuple[bool, str]:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(hook.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=hook.timeout_s) as response:  # validated http(s)
            code = int(response.status)
    except urllib.error.HTTPError as exc:
        return False, f"{hook.url} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{hook.url}: {type(exc).__name__}: {exc}"[:300]
    return 200 <= code < 300, f"{hook.url} answered HTTP {code}"


async def call_webhook(hook: Webhook | None, payload: dict[str, Any]) -> tuple[bool, str]:
    """POST ``payload`` as JSON; (2xx in time, what happened). No hook: allowed."""
    if hook is None:
        return True, "no webhook"
    return await asyncio.to_thread(_post, hook, payload)


class RolloutController:
    def __init__(self, client: EtcdClient, schema: KeySchema, *, identity: str | None = None,
                 tick: float = 1.0, lease_ttl: int = 5, scrape_timeout: float = 2.0,
                 prometheus_url: str | None = None, prometheus_timeout: float = 5.0,
                 scrape_tls: TlsSource = None, scrape_server_name: str | None = None) -> None:
        self.client = client
        self.scrape_tls = scrape_tls
        """HTTPS with the admin identity to the services' /metrics (figures.scrape_tls: the context is
        made again when its files are renewed); None: HTTP."""
        self.scrape_server_name = scrape_server_name
        self.prometheus_url = prometheus_url
        self.prometheus_timeout = prometheus_timeout
        self.schema = schema
        self.identity = identity or default_identity()
        self.tick = tick
        self.lease_ttl = lease_ttl
        self.scrape_timeout = scrape_timeout
        self.leading = False
        self._invalid: dict[bytes, int] = {}
        """Rollout keys whose document is invalid → the mod_revision already logged."""

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, lead until the lease is lost or ``stop`` is set, campaign again."""
        while not stop.is_set():
            try:
                await self._term(stop)
            except (EtcdError, LeaseLostError) as exc:
                self.leading = False
                log.warning("rollout_controller_etcd_problem", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _term(self, stop: asyncio.Event) -> None:
        lease = await self.client.grant_lease(self.lease_ttl)
        lost = False
        try:
            while not stop.is_set():
                written, _, holder = await self.client.put_if_mod_revision(
                    self.schema.rollout_leader, self.identity.encode(), 0, lease=lease)
                if written:
                    break
                log.debug("rollout_controller_follower", leader=holder.value.decode("utf-8", "replace")
                          if holder else None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.5, self.lease_ttl / 3))
            if stop.is_set():
                return
            self.leading = True
            log.info("rollout_controller_leading", identity=self.identity, lease_ttl=self.lease_ttl)
            keepalive = asyncio.create_task(LeaseKeepAlive(self.client, lease, self.lease_ttl).run())
            try:
                while not stop.is_set():
                    if keepalive.done():
                        lost = True
                        keepalive.result()  # raises LeaseLostError: campaign again
                    try:
                        await self.round()
                    except (EtcdError, LeaseLostError):
                        raise
                    except MeshError as exc:
                        log.warning("rollout_round_failed", error=str(exc))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.tick)
            finally:
                keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError, MeshError):
                    await keepalive
        finally:
            self.leading = False
            if not lost:
                # Handing the lease back lets another controller take over at once, not after a TTL.
                with contextlib.suppress(MeshError):
                    await self.client.revoke_lease(lease)

    async def round(self) -> None:
        """One pass over every rollout document."""
        snapshot = await self.client.get_prefix(self.schema.models_prefix)
        state = build_state(self.schema, snapshot.revision, snapshot.items)
        for kv in snapshot.items:
            try:
                if self.schema.parse(kv.key).kind is not KeyKind.ROLLOUT:
                    continue
            except InvalidKeyError:
                continue
            try:
                doc = parse_rollout_document(kv.value)
            except InvalidDocumentError as exc:
                if self._invalid.get(kv.key) != kv.mod_revision:
                    self._invalid[kv.key] = kv.mod_revision
                    log.warning("rollout_document_invalid", key=kv.key.decode("utf-8", "replace"), error=str(exc))
                continue
            if doc.state.phase.final and doc.state.request is None:
                continue
            model = state.model(doc.model)
            await self._drive(doc, kv, model)

    async def observe(self, doc: RolloutDocument, model: ModelState | None,
                      now: datetime | None = None) -> machine.Observation:
        targets: dict[str, str] = {}
        if model is not None:
            for version in (doc.baseline, doc.candidate):
                for instance_id, record in model.instances.get(version, {}).items():
                    if record.state is InstanceState.SERVING:
                        targets[instance_id] = metrics_address(record.address, record.admin_address)
        counters, problems = await scrape(targets, doc.model, doc.baseline, doc.candidate,
                                          timeout=self.scrape_timeout, tls=self.scrape_tls,
                                          server_name=self.scrape_server_name)
        started = {i: r.started for v in (doc.baseline, doc.candidate)
                   for i, r in (model.instances.get(v, {}) if model is not None else {}).items()}
        new = joined(doc.state.window_start, counters, started, doc.state.step_started)
        start = {**doc.state.window_start, **new}
        figures = window(start, counters, doc.baseline, doc.candidate) if counters else None
        routing = dict(model.routing.weights) if model is not None and model.routing is not None else None
        return machine.Observation(counters, figures, routing, tuple(problems.values()), joined=new,
                                   promql=await self._promql(doc, now or datetime.now(timezone.utc)))

    async def _promql(self, doc: RolloutDocument, now: datetime) -> dict[str, PromQLResult] | None:
        """The PromQL gates of a step that is due (interval over), else None (not asked)."""
        shadow = doc.current_step == SHADOW
        gates = [g for g in doc.gates.promql if g.in_shadow or not shadow]
        if not gates or not machine.due(doc, now):
            return None
        results = await evaluate(self.prometheus_url, doc, gates, timeout=self.prometheus_timeout)
        for name, result in results.items():
            if result.error is not None:
                log.warning("rollout_promql_failed", model=doc.model, gate=name, error=result.error)
        return results

    async def _drive(self, doc: RolloutDocument, kv: KeyValue, model: ModelState | None) -> None:
        now = datetime.now(timezone.utc)
        obs = await self.observe(doc, model, now)
        new, actions = machine.step(doc, obs, now)
        new = await self._act(new, actions, obs, model)
        if new == doc:
            return
        new = new.model_copy(update={"state": new.state.model_copy(update={"leader": self.identity, "updated": now})})
        if new.state.phase != doc.state.phase or new.state.step != doc.state.step:
            log.info("rollout_moved", model=doc.model, candidate=doc.candidate, phase=new.state.phase.value,
                     step=new.state.step, step_value=new.current_step, reason=new.state.reason)
        await self._store(new, kv)

    async def _act(self, doc: RolloutDocument, actions: list[machine.Action], obs: machine.Observation,
                   model: ModelState | None) -> RolloutDocument:
        for action in actions:
            if isinstance(action, machine.SetWeights):
                expected = model.routing_revision if model is not None else 0
                try:
                    change = await set_weights(self.client, self.schema, doc.model, action.weights,
                                               expected_revision=expected)
                    log.info("rollout_weights", model=doc.model, weights=action.weights, revision=change.revision)
                except ConflictError as exc:
                    # Someone wrote the routing meanwhile. A step's weights: the next round sees the
                    # change and pauses. A final phase's: not entered; the next round writes again.
                    log.warning("rollout_weights_conflict", model=doc.model, error=str(exc),
                                then=action.then.value if action.then else None)
                    doc = machine.not_written(doc, str(exc)[:300]) if action.then is not None else doc
                else:
                    doc = machine.written(doc) if action.then is not None else doc
            elif action.kind == "before_promotion":
                ok, detail = await call_webhook(doc.webhooks.before_promotion, action.payload)
                log.info("rollout_webhook", model=doc.model, kind=action.kind, ok=ok, detail=detail)
                after, more = machine.after_webhook(doc, ok, detail, datetime.now(timezone.utc), obs)
                return await self._act(after, more, obs, model)
            else:
                ok, detail = await call_webhook(doc.webhooks.on_rollback, action.payload)
                log.info("rollout_webhook", model=doc.model, kind=action.kind, ok=ok, detail=detail)
        return doc

    async def _store(self, new: RolloutDocument, kv: KeyValue) -> None:
        """Compare-and-swap; when the CLI wrote meanwhile (an operator request), keep its request."""
        revision = kv.mod_revision
        for _ in range(3):
            written, _, current = await self.client.put_if_mod_revision(kv.key, new.to_json(), revision)
            if written:
                return
            if current is None:
                log.info("rollout_document_deleted", model=new.model)
                return
            try:
                theirs = parse_rollout_document(current.value)
            except InvalidDocumentError:
                return
            if (theirs.candidate, theirs.baseline, theirs.created) != (new.candidate, new.baseline, new.created):
                return  # a new rollout replaced this one
            if theirs.state.request is not None:
                new = new.model_copy(update={"state": new.state.model_copy(update={
                    "request": theirs.state.request, "request_reason": theirs.state.request_reason})})
            revision = current.mod_revision
        log.warning("rollout_store_conflict", model=new.model)
