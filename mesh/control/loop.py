"""The controller loop: watch → state → debounce → reconcile → status.

Every component that turns the registry into routing runs this one loop with its own
``reconcile``: the Envoy gateway (:mod:`gateway.controller`), mesh-sync (:mod:`mesh.istio.sync`),
and the rollout controller to come. The loop

* watches the models prefix with :func:`~mesh.registry.etcd.watch_prefix` into an immutable
  :class:`~mesh.registry.state.RegistryState` (a resync after compaction, reconnect or an etcd
  reset replaces it whole);
* notes which models changed, skipping status keys: the controllers write those themselves, and
  a round for their own write would compare and change nothing;
* waits ``debounce`` so that a burst of writes is one round, then calls ``reconcile(state,
  changes)``; an error is logged and the next change (or :meth:`ControlLoop.request`) tries again;
* after an etcd reset (its data gone), forgets the status documents written
  (:meth:`~mesh.control.status.StatusWriter.forget`) and, for ``reset_grace`` seconds, hands
  ``reconcile`` the state shown before with what the new etcd holds on top
  (:func:`~mesh.registry.state.keep_missing`), so routes stay while services register again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from mesh.control.status import StatusWriter
from mesh.errors import MeshError
from mesh.registry.etcd import EtcdClient, KeyEvent, Resync, watch_prefix
from mesh.registry.keys import KeyKind, KeySchema
from mesh.registry.state import RegistryState, apply_event, build_state, keep_missing

log = structlog.get_logger("mesh.control.loop")


@dataclass(frozen=True)
class Changes:
    """What a round is for."""

    models: frozenset[str]
    """Models whose keys (status aside) changed since the last round."""
    everything: bool
    """Every model is to be reconciled: after a resync, on a periodic pass or a :meth:`ControlLoop.request`."""
    since: float | None
    """``time.monotonic()`` of the first registry change of the round (None: only a timer or a request)."""

    def includes(self, model: str) -> bool:
        return self.everything or model in self.models


Reconcile = Callable[[RegistryState, Changes], Awaitable[None]]
"""One round: make the world match ``state`` (for the models in ``changes``) and report status."""


class ControlLoop:
    """The loop of one controller (see the module docstring); :meth:`run` it with a reconcile."""

    def __init__(self, client: EtcdClient, schema: KeySchema, *, controller: str, debounce: float,
                 reset_grace: float = 0.0, resync_interval: float | None = None,
                 expected_errors: tuple[type[Exception], ...] = (MeshError,),
                 on_connection: Callable[[bool], None] | None = None) -> None:
        """``controller`` names it in logs; ``resync_interval`` (seconds) adds periodic full rounds;
        ``expected_errors`` are logged as one line, anything else with its traceback."""
        self.client = client
        self.schema = schema
        self.controller = controller
        self.debounce = debounce
        self.reset_grace = reset_grace
        self.resync_interval = resync_interval
        self.status = StatusWriter(client, schema, controller)
        self.state: RegistryState | None = None
        """The registry as watched (None until the first listing)."""
        self._expected = expected_errors
        self._on_connection = on_connection
        self._held: RegistryState | None = None
        """What the registry showed before etcd lost its data; shown on top until ``_held_until``."""
        self._held_until = 0.0
        self._pending: set[str] = set()
        self._everything = False
        self._since: float | None = None
        self._wake = asyncio.Event()
        self._log = log.bind(controller=controller)

    def request(self, models: Iterable[str] | None = None) -> None:
        """Ask for a round for ``models`` (None: all of them), e.g. to retry a failed one."""
        if models is None:
            self._everything = True
        else:
            self._pending.update(models)
        self._wake.set()

    def view(self) -> RegistryState | None:
        """The state to reconcile: the watched one, plus what is held after an etcd reset."""
        state = self.state
        if self._held is None or state is None:
            return state
        if time.monotonic() >= self._held_until:
            self._held = None
            self._log.info("registry_reset_grace_over", models=len(state.models))
            return state
        return keep_missing(state, self._held)

    async def run(self, reconcile: Reconcile) -> None:
        """Watch and reconcile until cancelled; a part that ends (it raised) ends the loop with its error."""
        parts = [asyncio.create_task(self.watch(), name=f"{self.controller}-watch"),
                 asyncio.create_task(self._rounds(reconcile), name=f"{self.controller}-reconcile")]
        if self.resync_interval is not None:
            parts.append(asyncio.create_task(self._periodic(self.resync_interval), name=f"{self.controller}-resync"))
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
            for part in done:
                part.result()
        finally:
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)

    async def watch(self) -> None:
        """Keep :attr:`state` equal to the registry and note what changed (runs until cancelled)."""
        def connection(ok: bool, error: str | None) -> None:
            if self._on_connection is not None:
                self._on_connection(ok)
            self._log.info("etcd_connection", connected=ok, error=error)

        async with contextlib.aclosing(watch_prefix(self.client, self.schema.models_prefix,
                                                    on_connection=connection)) as events:
            async for event in events:
                if isinstance(event, Resync):
                    self._resync(event)
                    self._note(None)
                elif self.state is not None:  # the first event is always a resync
                    self.state = apply_event(self.state, event)
                    self._note_key(event)

    def _resync(self, event: Resync) -> None:
        shown = self.view()
        if event.reason == "reset":
            self.status.forget()  # the status documents went with the data: write them again
            if shown is not None and self.reset_grace > 0:
                self._held = shown
                self._held_until = time.monotonic() + self.reset_grace
            self._log.warning("registry_reset", revision=event.revision,
                              held_models=len(shown.models) if shown is not None and self.reset_grace > 0 else 0,
                              grace=self.reset_grace)
        self.state = build_state(self.schema, event.revision, event.items)
        self._log.info("registry_resync", revision=event.revision, reason=event.reason,
                       models=len(self.state.models))

    def _note_key(self, event: KeyEvent) -> None:
        try:
            parsed = self.schema.parse(event.kv.key)
        except MeshError:
            return  # not a model's key: nothing to reconcile (the state lists it as unknown)
        if parsed.kind is not KeyKind.STATUS:  # our own status writes change nothing
            self._note([parsed.model])

    def _note(self, models: list[str] | None) -> None:
        if self._since is None:
            self._since = time.monotonic()
        self.request(models)

    async def _periodic(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.state is not None:
                self.request()

    async def _rounds(self, reconcile: Reconcile) -> None:
        while True:
            await self._wait_for_work()
            await asyncio.sleep(self.debounce)
            self._wake.clear()
            changes = Changes(frozenset(self._pending), self._everything, self._since)
            self._pending, self._everything, self._since = set(), False, None
            state = self.view()
            if state is None:
                continue
            try:
                await reconcile(state, changes)
            except self._expected as exc:
                self._log.error("reconcile_failed", error=str(exc))
            except Exception:
                self._log.exception("reconcile_crashed")

    async def _wait_for_work(self) -> None:
        """Until something is noted or requested; or until the reset grace is over (then the
        held models must go: a round for everything)."""
        while True:
            timeout = self._held_until - time.monotonic() if self._held is not None else None
            try:
                await asyncio.wait_for(self._wake.wait(), None if timeout is None else max(timeout, 0.0))
                return
            except TimeoutError:
                self.request()
                return
