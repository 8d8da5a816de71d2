"""``sluice debug profile | memory | threads INSTANCE``: a CPU profile, a memory snapshot (or diff) and
the stack of every thread of a running service or gateway controller, from its admin port.

INSTANCE is an instance id as ``sluice status`` prints it (the admin address comes from its etcd
record; the etcd flags say which etcd) or the admin port's host:port (``kubectl port-forward``).
An admin port that requires the admin identity (``--admin-tls-client-ca``) is called over HTTPS
with ``--admin-cert``/``--admin-key`` and ``--admin-ca``; their defaults are $SLUICE_ADMIN_CERT,
$SLUICE_ADMIN_KEY and $SLUICE_ADMIN_CA (what ``sluice env`` exports for a ``sluice up --secure``),
then $SLUICE_CLIENT_CERT, $SLUICE_CLIENT_KEY and $SLUICE_CA. ``--cert``/``--key`` are etcd's.
Errors are one line on stderr with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from mesh.debug.client import DebugError, Target, call, call_json, client_tls, resolve
from mesh.errors import MeshError
from mesh.observability import logging as sluice_logging
from mesh.observability.component import one_line
from mesh.observability.profiling import DEFAULT_HZ, MAX_HZ, MAX_SECONDS, format_thread_stacks
from mesh.registry.command import etcd_flags, settings_from_args

_INSTANCE_HELP = "instance id as sluice status shows it (admin address from etcd), or the admin port's host:port"


def register(subparsers: Any) -> None:
    debug = subparsers.add_parser("debug", help="profile, memory and thread stacks of a running process",
                                  description="Ask a running service or gateway controller, on its admin "
                                              "(metrics) port, for a CPU profile, a memory snapshot or diff, "
                                              "or the stack of every thread. docs/observability.md")
    actions = debug.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    common = etcd_flags()
    tls = common.add_argument_group("admin identity (an admin port started with --admin-tls-client-ca)")
    # --cert/--key/--ca-cert are etcd's (etcd_flags): the admin identity's flags say whose they are.
    tls.add_argument("--admin-cert", type=Path, help="PEM client certificate the admin CA signed: speak HTTPS "
                                                      "and present it (default $SLUICE_ADMIN_CERT, then "
                                                      "$SLUICE_CLIENT_CERT)")
    tls.add_argument("--admin-key", type=Path, help="PEM private key of --admin-cert (default $SLUICE_ADMIN_KEY, "
                                                     "then $SLUICE_CLIENT_KEY)")
    tls.add_argument("--admin-ca", type=Path, help="PEM CA that signed the admin port's certificate (default "
                                                    "$SLUICE_ADMIN_CA, then $SLUICE_CA; alone: HTTPS without a "
                                                    "client certificate)")
    tls.add_argument("--admin-server-name", metavar="NAME",
                     help="name the admin port's certificate must carry (default $SLUICE_ADMIN_SERVER_NAME, else the "
                          "host of the address; through kubectl port-forward that is 127.0.0.1)")

    profile = actions.add_parser("profile", parents=[common], help="sample every thread for --seconds",
                                 description="A wall-clock CPU profile of every thread (handler threads inside "
                                             "ONNX Runtime show as the frame calling session.run), sampled "
                                             "in the process: speedscope JSON (open it at speedscope.app) or "
                                             "collapsed stacks (flamegraph.pl).")
    profile.add_argument("instance", metavar="INSTANCE", help=_INSTANCE_HELP)
    profile.add_argument("--seconds", type=float, default=10.0, help=f"how long to sample (≤ {MAX_SECONDS:g})")
    profile.add_argument("--hz", type=int, default=DEFAULT_HZ, help=f"samples per second (1-{MAX_HZ})")
    profile.add_argument("--format", choices=("speedscope", "collapsed"), default="speedscope")
    profile.add_argument("--no-idle", action="store_true",
                         help="leave out samples of threads waiting (queue, select, lock)")
    profile.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    profile.set_defaults(func=_profile)

    memory = actions.add_parser("memory", parents=[common], help="memory snapshot, or diff from an earlier one",
                                description="RSS, garbage collector, tracemalloc's largest allocation sites "
                                            "(when tracing) and per loaded model version what is known. The "
                                            "process keeps the last 8 snapshots (m1, m2, ...) for --diff-from.")
    memory.add_argument("instance", metavar="INSTANCE", help=_INSTANCE_HELP)
    memory.add_argument("--diff-from", metavar="SNAPSHOT", help="id of an earlier snapshot (m3) to diff against")
    memory.add_argument("--top", type=int, default=15, help="allocation sites to list (0-500)")
    memory.add_argument("--trace", choices=("on", "off"),
                        help="switch tracemalloc first (off by default: it slows allocations)")
    memory.add_argument("--trace-frames", type=int, default=1, help="frames tracemalloc records (1-25)")
    memory.add_argument("-o", "--output", type=Path, help="also write the whole snapshot as JSON to this file")
    memory.set_defaults(func=_memory)

    threads = actions.add_parser("threads", parents=[common], help="the stack of every thread now",
                                 description="The stack of every thread (handler threads, batcher, watcher, "
                                             "event loop), innermost frame last: where a stuck request waits.")
    threads.add_argument("instance", metavar="INSTANCE", help=_INSTANCE_HELP)
    threads.add_argument("--json", action="store_true", help="JSON instead of text")
    threads.set_defaults(func=_threads)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _fail(message: str) -> int:
    print(f"sluice: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _target(args: argparse.Namespace) -> Target:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise DebugError(f"invalid etcd settings: {one_line(exc)}") from exc
    tls = _client_tls(args)
    server_name = args.admin_server_name or os.environ.get("SLUICE_ADMIN_SERVER_NAME") or None
    if server_name is not None and tls is None:
        raise DebugError("--admin-server-name needs HTTPS: give --admin-ca (and the admin certificate)")
    return resolve(args.instance, settings, tls, server_name)


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """HTTPS when a client certificate (flag, $SLUICE_ADMIN_CERT / _KEY or $SLUICE_CLIENT_CERT / _KEY),
    --admin-ca or $SLUICE_ADMIN_CA is given; $SLUICE_CA alone (the gateway's CA for model calls)
    leaves a plain admin port plain. A flag beats both variables, the admin ones beat the others."""
    cert = args.admin_cert or _env_path("SLUICE_ADMIN_CERT") or _env_path("SLUICE_CLIENT_CERT")
    key = args.admin_key or _env_path("SLUICE_ADMIN_KEY") or _env_path("SLUICE_CLIENT_KEY")
    ca = args.admin_ca or _env_path("SLUICE_ADMIN_CA")
    if cert is None and key is None and ca is None:
        return None
    return client_tls(ca or _env_path("SLUICE_CA"), cert, key)


def _guarded(args: argparse.Namespace, run: Any) -> int:
    sluice_logging.configure("warning", "console")
    try:
        return int(run(args, _target(args)))
    except (MeshError, OSError) as exc:
        return _fail(str(exc))


def _profile(args: argparse.Namespace) -> int:
    return _guarded(args, _run_profile)


def _memory(args: argparse.Namespace) -> int:
    return _guarded(args, _run_memory)


def _threads(args: argparse.Namespace) -> int:
    return _guarded(args, _run_threads)


class _Progress:
    """``profiling host:port: 3/10 s`` on stderr, redrawn every second on a terminal."""

    def __init__(self, target: Target, seconds: float, out: TextIO) -> None:
        self._target, self._seconds, self._out = target, seconds, out
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._draw, daemon=True)

    def __enter__(self) -> _Progress:
        self._out.write(f"profiling {self._target.shown} for {self._seconds:g}s ...")
        self._out.flush()
        if self._out.isatty():
            self._thread.start()
        return self

    def _draw(self) -> None:
        started = time.monotonic()
        while not self._done.wait(1.0):
            elapsed = min(time.monotonic() - started, self._seconds)
            self._out.write(f"\rprofiling {self._target.shown}: {elapsed:.0f}/{self._seconds:g}s ")
            self._out.flush()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        self._out.write("\n")
        self._out.flush()


def _run_profile(args: argparse.Namespace, target: Target) -> int:
    if not 0 < args.seconds <= MAX_SECONDS:
        return _fail(f"--seconds must be in (0, {MAX_SECONDS:g}], got {args.seconds:g}")
    if not 1 <= args.hz <= MAX_HZ:
        return _fail(f"--hz must be 1-{MAX_HZ}, got {args.hz}")
    params = {"seconds": f"{args.seconds:g}", "hz": args.hz, "format": args.format,
              "idle": "0" if args.no_idle else None}
    with _Progress(target, args.seconds, sys.stderr):
        _kind, body = call(target, "/debug/profile", params, timeout=args.seconds + 30.0)
    if args.format == "speedscope":
        try:
            document = json.loads(body)
            samples = sum(len(p["samples"]) for p in document["profiles"])
            summary = (f"{len(document['profiles'])} threads, {samples} distinct stacks, "
                       f"{document['sluice']['ticks']} ticks")
        except (ValueError, KeyError, TypeError) as exc:
            raise DebugError(f"{target.shown} answered a profile that is not speedscope JSON") from exc
    else:
        summary = f"{len(body.splitlines())} distinct stacks"
    if args.output is None:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    else:
        args.output.write_bytes(body)
        hint = "; open it at https://www.speedscope.app" if args.format == "speedscope" else ""
        print(f"wrote {args.output}: {summary}{hint}", file=sys.stderr)
    return 0


def _mib(value: Any) -> str:
    return f"{value / 1048576:.1f} MiB" if isinstance(value, int) else "?"


def _signed_mib(value: Any) -> str:
    return "?" if not isinstance(value, int) else f"{value / 1048576:+.2f} MiB"


def memory_text(document: dict[str, Any]) -> str:
    """What ``sluice debug memory`` prints for a snapshot (with its diff, if any)."""
    tracing = document.get("tracemalloc", {})
    lines = [f"snapshot {document.get('id')} taken {document.get('taken')}",
             f"  RSS {_mib(document.get('rss_bytes'))} (peak {_mib(document.get('peak_rss_bytes'))}), "
             f"threads {document.get('threads')}, gc objects {document.get('gc', {}).get('objects')}",
             f"  tracemalloc: {'on' if tracing.get('tracing') else 'off'}"
             + (f", traced {_mib(tracing.get('traced_bytes'))}, its own overhead "
                f"{_mib(tracing.get('overhead_bytes'))}" if tracing.get("tracing")
                else " (sluice debug memory INSTANCE --trace on)")]
    versions = document.get("component", {}).get("versions")
    if isinstance(versions, list):
        lines.append(f"  loaded versions: {len(versions)}")
        for v in versions[:50]:
            lines.append(f"    {v.get('model')}/{v.get('version')}: file {_mib(v.get('model_file_bytes'))}, "
                         f"arena {'on' if v.get('cpu_memory_arena') else 'off'}, inflight {v.get('inflight')}")
    for site in document.get("top", []):
        lines.append(f"  {site['bytes'] / 1048576:9.2f} MiB {site['count']:>9} allocations  {site['site']}")
    diff = document.get("diff")
    if isinstance(diff, dict):
        lines.append(f"since {diff.get('from')} ({diff.get('from_taken')}):")
        lines.append(f"  RSS {_signed_mib(diff.get('rss_bytes'))}, traced {_signed_mib(diff.get('traced_bytes'))}, "
                     f"threads {diff.get('threads'):+d}, gc objects {diff.get('gc_objects'):+d}")
        if diff.get("note"):
            lines.append(f"  {diff['note']}")
        for site in diff.get("top", []):
            lines.append(f"  {site['bytes'] / 1048576:+9.2f} MiB {site['count']:>+9} allocations  {site['site']}")
    lines.append(f"diff against it later: sluice debug memory INSTANCE --diff-from {document.get('id')}")
    return "\n".join(lines)


def _run_memory(args: argparse.Namespace, target: Target) -> int:
    if not 0 <= args.top <= 500:
        return _fail(f"--top must be 0-500, got {args.top}")
    if args.trace is not None:
        state = call_json(target, "/debug/memory/tracing",
                          {"on": "1" if args.trace == "on" else "0", "frames": args.trace_frames}, method="POST")
        print(f"tracemalloc {'on' if state.get('tracing') else 'off'} in {target.shown}", file=sys.stderr)
    document = call_json(target, "/debug/memory", {"top": args.top, "diff_from": args.diff_from}, timeout=120.0)
    if args.output is not None:
        args.output.write_text(json.dumps(document, indent=1))
    print(memory_text(document))
    return 0


def _run_threads(args: argparse.Namespace, target: Target) -> int:
    document = call_json(target, "/debug/threads", {"format": "json"})
    stacks = document.get("threads")
    if not isinstance(stacks, list):
        raise DebugError(f"{target.shown} answered a thread dump without threads")
    print(json.dumps(document, indent=1) if args.json else format_thread_stacks(stacks))
    return 0
