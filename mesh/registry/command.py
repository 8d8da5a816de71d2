"""``sluice models | status | weights …``: read the registry and steer traffic from a terminal.

Every etcd flag maps 1:1 to a field of :class:`mesh.registry.settings.EtcdSettings`; what a flag leaves
unset comes from ``SLUICE_ETCD_…`` in the environment, then the default. Errors are one line on
stderr with exit code 1 (etcd unreachable, invalid document, lost compare-and-swap, a model that
never registered, ``--wait`` timed out or saw the gateway fail to publish the change); exit code 3:
``--wait`` saw the gateway apply the change with differences (a weighted version without
instances, a fallback), said on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from pydantic import ValidationError

from mesh.errors import InvalidDocumentError, MeshError
from mesh.observability import logging as sluice_logging
from mesh.observability.component import add_settings_flags, given_flags, one_line
from mesh.registry.etcd.client import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceState, RoutingDocument, StatusDocument
from mesh.registry.settings import EtcdSettings
from mesh.registry.state import (
    ModelState,
    RegistryState,
    RoutingChange,
    RoutingDeletion,
    delete_routing,
    get_routing,
    load_state,
    promote,
    set_weights,
)

OUTPUT_FORMATS = ("table", "json", "yaml")
EXIT_APPLIED_WITH_DIFFERENCES = 3
"""``--wait``: the gateway rendered the change, but what it serves differs from the document."""
ETCD_SERVICE_ONLY = ("lease_ttl",)
ETCD_FLAGS = tuple(name for name in EtcdSettings.model_fields if name not in ETCD_SERVICE_ONLY)


def etcd_flags() -> argparse.ArgumentParser:
    """The etcd connection flags, shared by every command that talks to etcd (one per field of
    :class:`EtcdSettings`; the lease TTL is a flag of ``sluice serve`` only)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("etcd connection (env SLUICE_ETCD_<NAME>)")
    add_settings_flags(group, EtcdSettings, skip=ETCD_SERVICE_ONLY)
    return parent


def _output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table", help="output format")


def _wait_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait until the gateway has rendered this routing revision and report what it "
                             "serves: exit 0 if as written, 3 if with differences (said on stderr), 1 at once "
                             "if publishing it failed, 1 on timeout (default 0: do not wait)")


def _force_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="write even if MODEL has never registered (no instances, no gateway status): "
                             "routing prepared before its first instance starts")


Command = Callable[[argparse.Namespace, EtcdClient, KeySchema], Awaitable[int]]
Flag = Callable[[argparse.ArgumentParser], None]


def _if_revision_flag(verb: str, absent: str = "") -> Flag:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--if-revision", type=int, metavar="REV",
                            help=f"{verb} only if the routing document is still at this revision{absent}")
    return add


_WRITE_IF_REVISION = _if_revision_flag("write", " (0: absent)")


def _subcommand(parent: Any, name: str, command: Command, help_: str, description: str | None = None, *,
                model: str = "model name", optional_model: bool = False, flags: tuple[Flag, ...] = ()
                ) -> argparse.ArgumentParser:
    """One registry command: the etcd flags, MODEL first, then ``flags``; runs ``command``."""
    parser: argparse.ArgumentParser = parent.add_parser(name, parents=[etcd_flags()], help=help_,
                                                        description=description)
    if model:
        parser.add_argument("model", nargs="?" if optional_model else None, help=model)
    for flag in flags:
        flag(parser)
    parser.set_defaults(func=lambda args: _run(args, command))
    return parser


def register(subparsers: Any) -> None:
    _subcommand(subparsers, "models", _models, "list the models in the registry",
                "Per model: the versions with registered instances, INSTANCES = distinct instance ids "
                "(service processes; one process serving two versions counts once), and whether a "
                "routing document exists.", model="", flags=(_output_flag,))
    _subcommand(subparsers, "status", _status, "versions, instances and weights of models",
                "Per model and version: instances (address, state, age), the configured weight "
                "(routing document), the effective weight (what the gateway applied), last error; "
                "below the table, per model: the routing revision the gateway rendered, its "
                "warnings and errors, versions that failed to load with their reasons, and reloads "
                "that failed while an older copy serves on.",
                model="only this model (default: every model)", optional_model=True, flags=(_output_flag,))

    weights = subparsers.add_parser("weights", help="read or change a model's traffic split",
                                    description="Read, set or delete the routing document of a model.")
    actions = weights.add_subparsers(dest="action", metavar="ACTION", help="what to do")
    actions.required = True

    _subcommand(actions, "get", _weights_get, "show the routing document of MODEL", flags=(_output_flag,))

    set_ = _subcommand(actions, "set", _weights_set, "set the weights of MODEL, e.g. 1=90 2=10",
                       "Replace the weights with one compare-and-swap transaction: if anyone changed "
                       "the routing document meanwhile, nothing is written and the exit code is 1. "
                       "A model that has never registered is refused unless --force.",
                       flags=(_WRITE_IF_REVISION, _force_flag, _wait_flag))
    set_.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT",
                      help="relative weight per version (integers >= 0, summing to > 0)")
    set_.add_argument("--sticky-header", help="requests with equal values of this header stick to one "
                                              "version ('' removes it; default: keep)")
    set_.add_argument("--default-version", type=int,
                      help="version taking all traffic when no weighted one serves (0 removes; default: keep)")

    promote_ = _subcommand(actions, "promote", _weights_promote,
                           "send all traffic of MODEL to VERSION (weights {VERSION: 100})",
                           flags=(_WRITE_IF_REVISION, _force_flag, _wait_flag))
    promote_.add_argument("version", help="the version to take all traffic")

    _subcommand(actions, "delete", _weights_delete,
                "delete the routing document of MODEL (newest version takes all)",
                "Delete the routing document with one compare-and-delete transaction; the gateway "
                "then sends all traffic to the newest serving version. Nothing to delete is not "
                "an error.", flags=(_if_revision_flag("delete"), _wait_flag))




def settings_from_args(args: argparse.Namespace) -> EtcdSettings:
    """Flags that were given override the environment, which overrides the defaults."""
    return EtcdSettings(**given_flags(args, EtcdSettings.model_fields))


def _fail(message: str) -> int:
    print(f"sluice: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace, command: Command) -> int:
    sluice_logging.configure("warning", "console")
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        return _fail(f"invalid etcd settings: {one_line(exc)}")

    async def main() -> int:
        client = EtcdClient(settings)
        try:
            await client.connect()
            return await command(args, client, KeySchema(settings.prefix))
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except MeshError as exc:
        return _fail(str(exc))


def _print(data: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2, sort_keys=False))
    else:
        print(yaml.safe_dump(data, sort_keys=False).rstrip())


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """Seconds as every command shows them: ``0.42s`` under a minute, else ``3m``, ``2h``, ``5d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.0f}s"


def _weights_text(weights: dict[int, int]) -> str:
    return " ".join(f"{v}={w}" for v, w in sorted(weights.items())) or "(none)"


def _instance_ids(model: ModelState) -> set[str]:
    return {instance_id for records in model.instances.values() for instance_id in records}


def _printed_without_table(args: argparse.Namespace, revision: int, schema: KeySchema,
                           models: list[dict[str, Any]]) -> bool:
    """``-o json|yaml``, or no model to tabulate: printed here (True); else the caller's table."""
    if args.output != "table":
        _print({"revision": revision, "models": models}, args.output)
        return True
    if not models:
        print(f"no models under {schema.models_prefix}")
        return True
    return False


async def _models(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    state = await load_state(client, schema)
    # INSTANCES counts processes (distinct instance ids), not records: one process registers one
    # record per version it serves.
    data: list[dict[str, Any]] = [{"model": m.name, "versions": m.versions(), "serving_versions": m.serving_versions(),
             "instances": len(_instance_ids(m)), "has_routing": m.routing_revision > 0}
            for m in state.models.values()]
    if _printed_without_table(args, state.revision, schema, data):
        return 0
    rows = [[d["model"], ",".join(map(str, d["versions"])) or "-", str(d["instances"]),
             "yes" if d["has_routing"] else "no"] for d in data]
    print(_table(rows, ["MODEL", "VERSIONS", "INSTANCES", "ROUTING"]))
    return 0


def _errors_by_version(model: ModelState, state: InstanceState) -> dict[int, list[str]]:
    """Version → ``instance-id: error`` of each record in ``state`` that carries an error (or, for
    ``failed``, says that it gave none)."""
    found: dict[int, list[str]] = {}
    for version, records in model.instances.items():
        for instance_id, record in sorted(records.items()):
            if record.state is state and (record.error or state is InstanceState.FAILED):
                found.setdefault(version, []).append(f"{instance_id}: {record.error or 'no reason given'}")
    return found


def failed_versions(model: ModelState) -> dict[int, list[str]]:
    """Version → why it failed to load, per instance that registered it as ``failed``."""
    return _errors_by_version(model, InstanceState.FAILED)


def reload_errors(model: ModelState) -> dict[int, list[str]]:
    """Version → why its newest files failed to load while an older copy serves on, per instance
    (a ``serving`` record that carries an error: still routed to, the reload did not take)."""
    return _errors_by_version(model, InstanceState.SERVING)


def model_report(model: ModelState, now: float) -> dict[str, Any]:
    """One model of ``sluice status -o json``."""
    configured = model.routing.weights if model.routing else {}
    effective = model.status.effective_weights if model.status else {}
    versions = sorted(set(model.versions()) | set(configured) | set(effective))
    errors = [*([f"routing: {model.routing_error}"] if model.routing_error else []),
              *([f"status: {model.status_error}"] if model.status_error else []),
              *(model.status.errors if model.status else []), *model.problems]
    return {
        "model": model.name,
        "routing_revision": model.routing_revision,
        "routing": model.routing.to_dict() if model.routing else None,
        "status": model.status.model_dump(mode="json") if model.status else None,
        "versions": [{
            "version": version,
            "weight": configured.get(version),
            "effective_weight": effective.get(version),
            "instances": [{
                "instance_id": r.instance_id, "address": r.address, "state": r.state.value,
                "started": r.started.isoformat(), "age_s": round(now - r.started.timestamp(), 1),
                "sha256": r.sha256, "labels": r.labels, **({"error": r.error} if r.error else {}),
            } for r in model.instances.get(version, {}).values()],
        } for version in versions],
        "warnings": list(model.status.warnings) if model.status else [],
        "errors": errors,
        "failed_versions": {str(v): reasons for v, reasons in failed_versions(model).items()},
        "reload_errors": {str(v): reasons for v, reasons in reload_errors(model).items()},
    }


def _status_rows(report: dict[str, Any], has_routing: bool) -> list[list[str]]:
    rows: list[list[str]] = []
    last_error = report["errors"][0] if report["errors"] else "-"
    for version in report["versions"] or [{"version": "-", "weight": None, "effective_weight": None,
                                            "instances": []}]:
        instances = version["instances"] or [None]
        for i, inst in enumerate(instances):
            first = i == 0
            weight = version["weight"] if version["weight"] is not None else (0 if has_routing else "-")
            effective = version["effective_weight"] if version["effective_weight"] is not None else "-"
            rows.append([
                report["model"] if first and not rows else "",
                str(version["version"]) if first else "",
                f"{inst['address']} {inst['state']} {duration(inst['age_s'])}" if inst else "(no instances)",
                str(weight) if first else "",
                str(effective) if first else "",
                last_error if not rows else "",
            ])
    return rows


def _status_notes(model: ModelState) -> list[str]:
    """What the table cannot show: the routing the gateway rendered, its warnings and errors, the
    versions that failed to load, and reloads that failed while an older copy serves on."""
    notes: list[str] = []
    status = model.status
    if model.routing_error is not None:
        notes.append(f"routing document (revision {model.routing_revision}) is invalid: {model.routing_error} "
                     "(the gateway keeps the last good routing)")
    elif model.routing is None:
        notes.append("no routing document: all traffic to the newest serving version")
    if status is not None and model.routing_revision and status.routing_revision != model.routing_revision:
        notes.append(f"the gateway has not rendered routing revision {model.routing_revision} (its status "
                     f"answers for revision {status.routing_revision}): is `sluice gateway` running?")
    if status is not None and status.auth:
        notes.append("gateway auth: " + " ".join(f"{part}={mode}" for part, mode in status.auth.items()))
    notes += [f"warning: {warning}" for warning in (status.warnings if status else [])]
    notes += [f"error: {error}" for error in (status.errors if status else [])]
    notes += [f"problem: {problem}" for problem in model.problems]
    for version, reasons in failed_versions(model).items():
        notes += [f"version {version} failed to load on {reason}" for reason in reasons]
    for version, reasons in reload_errors(model).items():
        notes += [f"warning: version {version} on {reason}" for reason in reasons]
    return [f"{model.name}: {note}" for note in notes]


async def _status(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    state: RegistryState = await load_state(client, schema)
    models = list(state.models.values())
    if args.model is not None:
        models = [m for m in models if m.name == args.model]
        if not models:
            return _fail(f"model {args.model!r} is not in the registry under {schema.models_prefix}")
    now = time.time()
    reports = [model_report(m, now) for m in models]
    if _printed_without_table(args, state.revision, schema, reports):
        return 0
    rows = [row for m, r in zip(models, reports, strict=True) for row in _status_rows(r, m.routing is not None)]
    print(_table(rows, ["MODEL", "VERSION", "INSTANCES (address state age)", "WEIGHT", "EFFECTIVE",
                        "LAST ERROR"]))
    for model in models:
        for note in _status_notes(model):
            print(note)
    return 0


async def _weights_get(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    routing, revision = await get_routing(client, schema, args.model)
    if args.output != "table":
        _print({"model": args.model, "revision": revision,
                "routing": routing.to_dict() if routing else None}, args.output)
        return 0
    if routing is None:
        print(f"{args.model}: no routing document: all traffic to the newest serving version")
        return 0
    shares = " ".join(f"{v}={w} ({p:.1f}%)" for (v, w), p in
                      zip(sorted(routing.weights.items()), routing.percentages().values(), strict=True))
    extras = "".join(f" {name}={value}" for name, value in
                     (("sticky_header", routing.sticky_header), ("default_version", routing.default_version))
                     if value is not None)
    print(f"{args.model}: {shares}{extras} (revision {revision})")
    return 0


def parse_weight_args(pairs: list[str]) -> dict[str, Any]:
    """``["1=90", "2=10"]`` → ``{"1": 90, "2": 10}``; non-integers pass through to the validator."""
    weights: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep:
            problems.append(f"weights: expected VERSION=WEIGHT, got {pair!r}")
            continue
        if version.strip() in weights:
            problems.append(f"weights: version {version.strip()!r} appears twice")
        try:
            weights[version.strip()] = int(weight)
        except ValueError:
            weights[version.strip()] = weight
    if problems:
        raise InvalidDocumentError("weights", problems)
    return weights


async def unregistered_model_problem(client: EtcdClient, schema: KeySchema, model: str) -> str | None:
    """Why routing for ``model`` would be a phantom (None when it has registered): no instance is
    registered and no gateway wrote a status for it, so the name is probably a typo."""
    state = await load_state(client, schema)
    found = state.model(model)
    if found is not None and (found.versions() or found.status is not None or found.status_error is not None):
        return None
    known = sorted(name for name, m in state.models.items() if m.versions() or m.status is not None)
    return (f"model {model!r} has never registered under {schema.models_prefix} (no instances, no gateway "
            f"status); models: {', '.join(known) or 'none'}. Check the name, or add --force to write its "
            "routing before its first instance registers")


async def _report_change(change: RoutingChange, client: EtcdClient, schema: KeySchema) -> int:
    before = _weights_text(change.before.weights) if change.before else (
        "(invalid document)" if change.before_error else "(no routing document)")
    print(f"{change.model}: {before} → {_weights_text(change.after.weights)} (revision {change.revision})")
    snapshot = await client.get_prefix(schema.instances_prefix(change.model))
    state = await load_state(client, schema) if snapshot.items else None
    model = state.model(change.model) if state else None
    serving = set(model.serving_versions()) if model else set()
    for version, weight in sorted(change.after.weights.items()):
        if weight > 0 and version not in serving:
            print(f"warning: version {version} has weight {weight} but no serving instances: the gateway "
                  "leaves it out until one registers", file=sys.stderr)
    return 0


async def _guarded(args: argparse.Namespace, client: EtcdClient, schema: KeySchema,
                   write: Callable[[], Awaitable[RoutingChange]]) -> int:
    """A routing write as ``set`` and ``promote`` do it: refuse a phantom model, report, wait."""
    if not args.force:
        problem = await unregistered_model_problem(client, schema, args.model)
        if problem is not None:
            return _fail(problem)
    change = await write()
    await _report_change(change, client, schema)
    if args.wait <= 0:
        return 0
    return await _wait_applied(client, schema, change.model, change.revision, timeout=args.wait,
                               written=change.after)


async def _weights_set(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    weights = parse_weight_args(args.weights)
    return await _guarded(args, client, schema, lambda: set_weights(
        client, schema, args.model, weights, sticky_header=args.sticky_header,
        default_version=args.default_version, expected_revision=args.if_revision))


async def _weights_promote(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    return await _guarded(args, client, schema, lambda: promote(
        client, schema, args.model, args.version, expected_revision=args.if_revision))


async def _weights_delete(args: argparse.Namespace, client: EtcdClient, schema: KeySchema) -> int:
    deletion: RoutingDeletion = await delete_routing(client, schema, args.model, expected_revision=args.if_revision)
    if deletion.revision == 0:
        print(f"{args.model}: no routing document: nothing to delete")
        return 0
    before = _weights_text(deletion.before.weights) if deletion.before else "(invalid document)"
    print(f"{args.model}: {before} → (no routing document: all traffic to the newest serving version) "
          f"(revision {deletion.revision})")
    if deletion.dropped_access is not None:
        print(f"warning: the deleted document's access rule (claim {deletion.dropped_access.claim!r}) is gone: "
              "the model's routes now take the default rule (the access claim lists the model)", file=sys.stderr)
    if args.wait <= 0:
        return 0
    return await _wait_applied(client, schema, args.model, deletion.revision, timeout=args.wait, written=None)


def applied_differences(status: StatusDocument, written: RoutingDocument | None) -> list[str]:
    """Why what the gateway serves differs from the routing document ``written`` (None: deleted),
    given a status that answers for it; empty when served as written."""
    reasons = [*status.warnings, *status.errors]
    if written is not None:
        wanted = {v: w for v, w in written.weights.items() if w > 0}
        if status.effective_weights != wanted and not reasons:
            reasons.append(f"the weights in force are not those written ({_weights_text(wanted)})")
    return reasons


def wait_outcome(status: StatusDocument, model: str, revision: int, written: RoutingDocument | None,
                 elapsed: str) -> tuple[int, str] | None:
    """What ``--wait`` reports once ``status`` answers for the write at routing ``revision``
    (``written`` None: a deletion): (exit code, message), or None while it answers for an older one.

    A failed publish ends the wait only when the snapshot that failed carried this very write: a
    failure of an older revision still leaves the newer one to be rendered.
    """
    failed = status.failed_routing_revision
    if written is None:
        answered, carried = status.routing_source == "none", failed == 0
    else:
        answered, carried = status.routing_revision >= revision, failed == revision
        if not answered and failed is not None and failed > revision:
            answered = True  # a newer write failed: this one is superseded (said below)
    if answered:
        newer = max(status.routing_revision, failed or 0)
        if written is not None and newer > revision:
            return 1, (f"sluice: error: routing of {model!r} was changed again (revision {newer}) before the "
                       f"gateway reported revision {revision}")
        differences = applied_differences(status, written)
        served = _weights_text(dict(status.effective_weights))
        if not differences:
            return 0, (f"{model}: applied by the gateway within {elapsed} (Envoy config "
                       f"{status.envoy_config_version}; effective weights {served})")
        return EXIT_APPLIED_WITH_DIFFERENCES, (f"{model}: applied with differences within {elapsed}: "
                                               f"{'; '.join(differences)}; effective weights {served}")
    if carried:
        what = f"routing revision {revision}" if written is not None else "the deletion of its routing document"
        return 1, (f"sluice: error: the gateway failed to publish {what} of {model!r} within {elapsed}: "
                   f"{'; '.join(status.errors) or 'no reason given'}; effective weights "
                   f"{_weights_text(dict(status.effective_weights))} (it retries with backoff)")
    return None


async def _wait_applied(client: EtcdClient, schema: KeySchema, model: str, revision: int, *, timeout: float,
                        written: RoutingDocument | None) -> int:
    """Poll the model's status document until the gateway answers for routing ``revision``, then
    report what it serves: as written (0), with differences and why (3), or that publishing it
    failed (1, at once: see :func:`wait_outcome`)."""
    started = time.monotonic()
    status: StatusDocument | None = None
    while time.monotonic() - started < timeout:
        found = (await load_state(client, schema)).model(model)
        status = found.status if found is not None else None
        outcome = None if status is None else wait_outcome(status, model, revision, written,
                                                            duration(time.monotonic() - started))
        if outcome is not None:
            code, message = outcome
            print(message, file=sys.stdout if code == 0 else sys.stderr)
            return code
        await asyncio.sleep(0.02)
    seen = f" (its status answers for routing revision {status.routing_revision})" if status is not None else ""
    problems = f"; it reports: {'; '.join(status.errors)}" if status is not None and status.errors else ""
    print(f"sluice: error: the gateway has not applied routing revision {revision} of {model!r} within "
          f"{duration(timeout)}{seen}{problems}; is `sluice gateway` running on this etcd prefix?", file=sys.stderr)
    return 1
