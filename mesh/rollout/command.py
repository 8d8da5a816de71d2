"""``sluice rollout start|status|pause|resume|promote|abort`` and ``sluice rollout-controller``.

The CLI writes the rollout document (start) and operator requests (pause, resume, promote,
abort) with compare-and-swap; the controller carries them out on its next round and records the
outcome. Errors are one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh.errors import ConflictError, InvalidDocumentError, MeshError
from mesh.registry.etcd.client import EtcdClient
from mesh.registry.keys import KeySchema, validate_version
from mesh.rollout.document import Phase, RolloutDocument, parse_rollout_document

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class RolloutControllerSettings(BaseSettings):
    """Settings of ``sluice rollout-controller`` (env prefix ``SLUICE_ROLLOUT_``)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_ROLLOUT_", extra="forbid", frozen=True,
                                      use_attribute_docstrings=True)

    tick: float = Field(1.0, gt=0, le=600)
    """Seconds between rounds (scrape every instance, judge, act)."""
    leader_ttl: int = Field(5, ge=2, le=600)
    """TTL of the leader lease: a killed leader is replaced after at most this long."""
    scrape_timeout: float = Field(2.0, gt=0, le=60)
    """Seconds to wait for one instance's /metrics."""
    identity: str | None = None
    """Name in the leader key and the rollout documents (default: host-pid)."""
    prometheus_url: str | None = Field(None, max_length=2048)
    """Prometheus to ask for the rollouts' PromQL gates (``http://prometheus:9090``); without it
    such a gate stays inconclusive and holds its step."""
    prometheus_timeout: float = Field(5.0, gt=0, le=60)
    """Seconds to wait for one PromQL gate's answer (then it is inconclusive, and says so)."""
    metrics_ca: Path | None = None
    """PEM CA that signed the services' certificates: scrape their /metrics over HTTPS (services
    started with --admin-tls-client-ca) and check their certificate against it."""
    metrics_cert: Path | None = None
    """PEM client certificate signed by the services' --admin-tls-client-ca (the admin identity),
    presented when scraping."""
    metrics_key: Path | None = None
    """PEM private key of --metrics-cert."""
    metrics_server_name: str | None = Field(None, max_length=253)
    """Name the services' certificates must carry (default: the host of each instance's admin
    address; a pod IP is rarely in a certificate)."""

    @model_validator(mode="after")
    def _scrape_tls_usable(self) -> RolloutControllerSettings:
        from mesh.rollout.figures import scrape_tls  # here, as the other imports: `sluice --help` stays light

        if self.metrics_server_name is not None and self.metrics_ca is None:
            raise ValueError("--metrics-server-name needs --metrics-ca (it names the certificate to check)")
        scrape_tls(self.metrics_ca, self.metrics_cert, self.metrics_key)  # a bad file: one line naming the flag
        return self

    @field_validator("prometheus_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"prometheus_url {value[:80]!r} is not an http:// or https:// URL")
        return value
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """JSON lines, console, or auto (console on a TTY)."""


def parse_duration(text: str) -> float:
    """``60s``, ``2m``, ``500ms``, ``1.5h`` or plain seconds."""
    match = _DURATION_RE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 60s, 2m or 500ms")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_share(text: str) -> float:
    """``0.5%`` → 0.005; ``0.99`` stays 0.99."""
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share such as 0.5% or 0.005") from None
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0% and 100%")
    return share


def parse_steps(text: str) -> list[str | int]:
    steps: list[str | int] = []
    for raw in text.split(","):
        part = raw.strip()
        if part == "shadow":
            steps.append(part)
        elif part.isdigit():
            steps.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"step {part!r} is neither 'shadow' nor a percentage")
    return steps


def register(subparsers: Any) -> None:
    from mesh.observability.component import add_settings_flags
    from mesh.registry.command import etcd_flags

    common = etcd_flags()
    rollout = subparsers.add_parser("rollout", help="progressive delivery of a model version",
                                    description="Start, watch and steer rollouts (docs/rollouts.md).")
    actions = rollout.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    start = actions.add_parser("start", parents=[common], help="roll VERSION of MODEL out, step by step")
    start.add_argument("model")
    start.add_argument("version", help="the candidate version")
    start.add_argument("--baseline", help="the version it replaces (default: the one with most weight, else "
                                          "the newest other serving version)")
    start.add_argument("--steps", type=parse_steps, default=["shadow", 5, 25, 50, 100],
                       help="comma-separated: shadow first (optional), percentages growing to 100 "
                            "(default shadow,5,25,50,100)")
    start.add_argument("--interval", type=parse_duration, default=60.0, help="time per step (default 60s)")
    start.add_argument("--max-error-rate", type=parse_share, default=0.005, help="default 0.5%%")
    start.add_argument("--max-p99-ratio", type=float, default=1.5, help="default 1.5")
    start.add_argument("--p99-slack", type=parse_duration, default=0.001,
                       help="a p99 this close to the baseline's passes whatever the ratio (default 1ms)")
    start.add_argument("--min-agreement", type=parse_share, default=0.99, help="default 99%%")
    start.add_argument("--min-requests", type=int, default=200, help="per step (default 200)")
    start.add_argument("--shadow-fraction", type=parse_share, default=1.0,
                       help="share of the baseline's requests also run on the candidate (default 100%%)")
    start.add_argument("--rtol", type=float, default=1e-5, help="shadow comparison tolerance (default 1e-5)")
    start.add_argument("--atol", type=float, default=1e-6, help="shadow comparison tolerance (default 1e-6)")
    start.add_argument("--compare", choices=("auto", "allclose", "argmax", "exact"), default="auto",
                       help="how shadow outputs are compared (default auto)")
    start.add_argument("--promql-gate", nargs=4, action="append", default=[],
                       metavar=("NAME", "QUERY", "CMP", "THRESHOLD"),
                       help="a gate on a Prometheus query (repeatable): the result must be CMP (<, <=, >, >=) "
                            "THRESHOLD; {{model}}, {{candidate}}, {{baseline}}, {{interval}} are filled in; "
                            "needs the controller's --prometheus-url")
    start.add_argument("--before-promotion-webhook", metavar="URL")
    start.add_argument("--on-rollback-webhook", metavar="URL")
    start.add_argument("--webhook-timeout", type=parse_duration, default=5.0)
    start.add_argument("--replace", action="store_true", help="replace a finished rollout of MODEL")
    start.set_defaults(func=lambda args: _run(args, _start))

    status = actions.add_parser("status", parents=[common], help="where rollouts stand")
    status.add_argument("model", nargs="?")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument("--watch", action="store_true", help="redraw every second until interrupted")
    status.set_defaults(func=lambda args: _run(args, _status))

    for name, text in (("pause", "hold the rollout where it is"),
                       ("resume", "continue a paused rollout (its step's window starts again)"),
                       ("promote", "promote the candidate now (the before-promotion webhook is asked)"),
                       ("abort", "send all traffic back to the baseline")):
        sub = actions.add_parser(name, parents=[common], help=text)
        sub.add_argument("model")
        sub.add_argument("--reason", default="", help="recorded with the request")
        sub.set_defaults(func=lambda args, name=name: _run(args, lambda a, c, s: _request(a, c, s, name)))

    controller = subparsers.add_parser(
        "rollout-controller", parents=[common], help="drive every rollout (one leader per etcd prefix)",
        description="Judge each rollout's gates on the services' /metrics every tick and move its "
                    "weights. Several may run: one leads through an etcd lease, the others wait. Each "
                    "flag can also be set as SLUICE_ROLLOUT_<FLAG>.")
    add_settings_flags(controller, RolloutControllerSettings)
    controller.set_defaults(func=run_controller)


def run_controller(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mesh.observability.component import fail, given_flags, one_line, run_component
    from mesh.registry.command import settings_from_args
    from mesh.rollout.controller import RolloutController
    from mesh.rollout.figures import scrape_tls

    try:
        settings = RolloutControllerSettings(**given_flags(args, RolloutControllerSettings.model_fields))
        etcd = settings_from_args(args)
    except (ValidationError, ValueError) as exc:
        return fail("rollout-controller", f"invalid settings: {one_line(exc)}", 2)

    async def main(stop: asyncio.Event) -> None:
        client = EtcdClient(etcd)
        await client.connect()
        try:
            controller = RolloutController(client, KeySchema(etcd.prefix), identity=settings.identity,
                                           tick=settings.tick, lease_ttl=settings.leader_ttl,
                                           scrape_timeout=settings.scrape_timeout,
                                           prometheus_url=settings.prometheus_url,
                                           prometheus_timeout=settings.prometheus_timeout,
                                           scrape_tls=scrape_tls(settings.metrics_ca, settings.metrics_cert,
                                                                 settings.metrics_key),
                                           scrape_server_name=settings.metrics_server_name)
            await controller.run(stop)
        finally:
            await client.close()

    return run_component("rollout-controller", main, log=settings, errors={MeshError: 1})


def _run(args: argparse.Namespace, command: Any) -> int:
    from mesh.registry.command import _run as run_registry  # one etcd session and error output for all

    return run_registry(args, command)


def _promql_gate(name: str, query: str, comparison: str, threshold: str) -> dict[str, Any]:
    """One ``--promql-gate`` (checked with the document: every problem named by its field)."""
    try:
        value: Any = float(threshold)
    except ValueError:
        value = threshold
    return {"name": name, "query": query, "comparison": comparison, "threshold": value}


async def _start(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    from mesh.registry.state import load_state

    candidate = validate_version(args.version)
    state = (await load_state(client, schema)).model(args.model)
    if state is None or candidate not in state.versions():
        print(f"sluice: error: version {candidate} of {args.model!r} has no registered instance: start the "
              "rollout once it serves (`sluice status`)", file=sys.stderr)
        return 1
    baseline = validate_version(args.baseline) if args.baseline else None
    if baseline is None:
        weights = state.routing.weights if state.routing else {}
        weighted = sorted((w, v) for v, w in weights.items() if v != candidate and w > 0)
        others = [v for v in state.serving_versions() if v != candidate]
        baseline = weighted[-1][1] if weighted else (others[-1] if others else None)
    if baseline is None:
        print(f"sluice: error: {args.model!r} has no other serving version to compare with: give --baseline",
              file=sys.stderr)
        return 1
    start_weights = dict(state.routing.weights) if state.routing else {}
    if not start_weights.get(baseline, 0) + start_weights.get(candidate, 0) and any(start_weights.values()):
        print(f"sluice: error: version {baseline} of {args.model!r} has no weight in its routing (weights "
              f"{' '.join(f'{v}={w}' for v, w in sorted(start_weights.items()))}): a rollout moves the "
              "baseline's traffic to the candidate; give --baseline a weighted version", file=sys.stderr)
        return 1
    webhooks: dict[str, Any] = {}
    if args.before_promotion_webhook:
        webhooks["before_promotion"] = {"url": args.before_promotion_webhook, "timeout_s": args.webhook_timeout}
    if args.on_rollback_webhook:
        webhooks["on_rollback"] = {"url": args.on_rollback_webhook, "timeout_s": args.webhook_timeout}
    doc = parse_rollout_document({
        "model": args.model, "candidate": candidate, "baseline": baseline, "steps": args.steps,
        "interval_s": args.interval,
        "gates": {"max_error_rate": args.max_error_rate, "max_p99_ratio": args.max_p99_ratio,
                  "p99_slack_ms": 1000 * args.p99_slack,
                  "min_agreement": args.min_agreement, "min_requests": args.min_requests,
                  "promql": [_promql_gate(*gate) for gate in args.promql_gate]},
        "shadow": {"fraction": args.shadow_fraction, "rtol": args.rtol, "atol": args.atol, "compare": args.compare},
        "webhooks": webhooks,
        # What a rollback or abort restores (the candidate at 0).
        "start_weights": {str(v): w for v, w in start_weights.items()},
    })
    key = schema.rollout(args.model)
    current = await client.get(key)
    revision = 0
    if current is not None:
        try:
            existing = parse_rollout_document(current.value)
        except InvalidDocumentError:
            existing = None
        if existing is not None and not existing.state.phase.final:
            print(f"sluice: error: a rollout of {args.model!r} (version {existing.candidate}) is "
                  f"{existing.state.phase.value}: abort it first", file=sys.stderr)
            return 1
        if not args.replace:
            print(f"sluice: error: {args.model!r} has a finished rollout (version "
                  f"{existing.candidate if existing else '?'}): add --replace to start a new one", file=sys.stderr)
            return 1
        revision = current.mod_revision
    written, _, _ = await client.put_if_mod_revision(key, doc.to_json(), revision)
    if not written:
        raise ConflictError(f"the rollout of {args.model!r} changed concurrently: try again")
    steps = " → ".join(str(s) for s in doc.steps)
    print(f"{args.model}: rollout of version {candidate} over {baseline} started: {steps}, "
          f"{args.interval:g}s per step (`sluice rollout status {args.model}`; needs `sluice rollout-controller`)")
    return 0


async def _request(args: argparse.Namespace, client: EtcdClient, schema: KeySchema, request: str) -> int:
    key = schema.rollout(args.model)
    for _ in range(5):
        current = await client.get(key)
        if current is None:
            print(f"sluice: error: {args.model!r} has no rollout", file=sys.stderr)
            return 1
        doc = parse_rollout_document(current.value)
        if doc.state.phase.final:
            print(f"sluice: error: the rollout of {args.model!r} is already {doc.state.phase.value}: "
                  f"{doc.state.reason}", file=sys.stderr)
            return 1
        updated = doc.model_copy(update={"state": doc.state.model_copy(update={
            "request": request, "request_reason": args.reason[:500]})})
        written, _, _ = await client.put_if_mod_revision(key, updated.to_json(), current.mod_revision)
        if written:
            print(f"{args.model}: {request} requested (the rollout controller carries it out on its next round)")
            return 0
    raise ConflictError(f"the rollout of {args.model!r} kept changing: try again")


def _left(doc: RolloutDocument, now: datetime) -> str:
    if doc.state.phase is not Phase.RUNNING or doc.state.step_started is None:
        return "-"
    return f"{max(0.0, doc.interval_s - (now - doc.state.step_started).total_seconds()):.0f}s"


def _gate_text(doc: RolloutDocument) -> list[str]:
    last = doc.state.decisions[-1] if doc.state.decisions else None
    if last is None:
        return ["no decision yet"]
    lines = [f"last decision: step {last.step} {last.verdict.value}: {last.reason}"]
    for name, gate in last.figures.get("gates", {}).items():
        figure = gate.get("figure")
        shown = "-" if figure is None else f"{figure:.4g}"
        detail = f": {str(gate['detail'])[:300]}" if gate.get("detail") else ""
        lines.append(f"  {name}: {shown} (limit {gate.get('limit')}) {gate.get('verdict')}{detail}")
    return lines


def shown_weights(doc: RolloutDocument) -> dict[int, int]:
    """The weights the rollout wants now: those of a final phase being entered (or entered), else
    the current step's."""
    if doc.state.finishing_weights is not None:
        return doc.state.finishing_weights
    if doc.state.phase in (Phase.ROLLED_BACK, Phase.ABORTED):
        return doc.restored_weights()
    return doc.weights_for(doc.current_step)


def status_report(doc: RolloutDocument, now: datetime) -> dict[str, Any]:
    data: dict[str, Any] = doc.model_dump(mode="json")
    data["state"].pop("window_start", None)
    data["current_step"] = doc.current_step
    data["weights"] = {str(v): w for v, w in shown_weights(doc).items()}
    data["time_left"] = _left(doc, now)
    return data


async def _status(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    import json

    while True:
        snapshot = await client.get_prefix(schema.models_prefix)
        docs: list[RolloutDocument] = []
        problems: list[str] = []
        for kv in snapshot.items:
            if not kv.key.endswith(b"/rollout"):
                continue
            try:
                doc = parse_rollout_document(kv.value)
            except InvalidDocumentError as exc:
                problems.append(f"{kv.key.decode('utf-8', 'replace')}: {exc}")
                continue
            if args.model is None or doc.model == args.model:
                docs.append(doc)
        now = datetime.now(timezone.utc)
        if args.output == "json":
            print(json.dumps({"rollouts": [status_report(d, now) for d in docs], "problems": problems}, indent=2))
        else:
            if args.watch:
                print("\x1b[2J\x1b[H", end="")
            if not docs:
                print("no rollouts" + (f" of {args.model!r}" if args.model else ""))
            for doc in docs:
                weights = " ".join(f"{v}={w}" for v, w in sorted(shown_weights(doc).items()))
                steps = " ".join(f"[{s}]" if i == doc.state.step else str(s) for i, s in enumerate(doc.steps))
                print(f"{doc.model}: version {doc.candidate} over {doc.baseline}: {doc.state.phase.value}, "
                      f"step {steps}, weights {weights}, time left {_left(doc, now)}")
                if doc.state.reason:
                    print(f"  {doc.state.reason}")
                if doc.state.finishing is not None:
                    print(f"  {doc.state.finishing.value} once these weights are written (retried every round)")
                if doc.state.request:
                    print(f"  requested: {doc.state.request} (waiting for the rollout controller)")
                for line in _gate_text(doc):
                    print(f"  {line}")
            for problem in problems:
                print(f"problem: {problem}")
        if not args.watch:
            return 1 if args.model is not None and not docs else 0
        if docs and all(d.state.phase.final for d in docs):
            return 0 if all(d.state.phase is Phase.PROMOTED for d in docs) else 1
        await asyncio.sleep(1.0)

