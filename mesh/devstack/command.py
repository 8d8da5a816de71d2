"""``sluice up`` / ``sluice down``: the whole stack on this machine, on loopback."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``sluice up``, ``env``, ``traces`` and ``down`` to the ``sluice`` parser."""
    from mesh.devstack.stack import StackConfig
    from mesh.observability.component import add_settings_flags

    up = subparsers.add_parser(
        "up", help="run etcd, model services, the gateway controller and Envoy on this machine",
        description="Start the whole stack on 127.0.0.1 and keep it running until Ctrl-C or SIGTERM. "
                    "Free ports are chosen for anything not given. Logs go to <run-dir>/logs/.")
    add_settings_flags(up, StackConfig)
    up.set_defaults(func=run_up)

    env = subparsers.add_parser(
        "env", help="print shell exports for a running `sluice up` (eval \"$(sluice env)\")",
        description="Prints SLUICE_GATEWAY, SLUICE_ETCD_ENDPOINTS and SLUICE_ETCD_PREFIX of the stack "
                    "that `sluice up` runs from --run-dir, so later commands find it without flags.")
    env.add_argument("--run-dir", type=Path, default=Path(".sluice"))
    env.set_defaults(func=run_env)

    register_traces(subparsers)

    down = subparsers.add_parser("down", help="stop a running `sluice up`")
    down.add_argument("--run-dir", type=Path, default=Path(".sluice"))
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(func=run_down)


def run_up(args: argparse.Namespace) -> int:
    """Start the stack and keep it up until Ctrl-C or SIGTERM (a second one kills it at once)."""
    from pydantic import ValidationError

    from mesh.devstack.stack import LocalStack, StackConfig, StackError
    from mesh.observability.component import fail, given_flags, one_line, run_component

    try:
        config = StackConfig(**given_flags(args, StackConfig.model_fields))
    except ValidationError as exc:
        return fail("up", f"invalid settings: {one_line(exc)}", 2)
    stack = LocalStack(config, progress=lambda line: print(line, flush=True))

    try:
        stack.acquire()
    except StackError as exc:
        print(f"sluice up: {exc}")  # stdout, with the rest of what `sluice up` tells its user
        return 1

    def main() -> int:
        try:
            return _keep_up(stack)
        finally:
            stack.stop()
            stack.release()
            print("sluice up: stopped", flush=True)

    return run_component("up", main, on_force=stack.kill)


def _keep_up(stack: Any) -> int:
    """Start every piece, then watch them until one dies (1) or the first signal (0)."""
    from mesh.devstack.stack import StackError

    config = stack.config
    try:
        print(f"sluice up: starting in {config.run_dir.resolve()} (logs in {config.run_dir / 'logs'})", flush=True)
        started = time.monotonic()
        stack.prepare_repo()
        stack.start_traces()
        stack.start_etcd()
        stack.start_services()
        stack.start_gateway()
        print(f"\nsluice is up in {time.monotonic() - started:.1f}s. Gateway: {stack.gateway_address}\n", flush=True)
        print(_status(stack), flush=True)
        print(_next_steps(stack), flush=True)
        while True:
            dead = stack.check()
            if dead is not None:
                print(f"sluice up: {dead.name} exited unexpectedly; last lines of {dead.log_path}:\n{dead.tail()}")
                return 1
            time.sleep(0.5)
    except StackError as exc:
        print(f"sluice up: {exc}")
        return 1
    except KeyboardInterrupt:
        print("\nsluice up: stopping (gateway, services, etcd) ...", flush=True)
        return 0


def _status(stack: Any) -> str:
    from mesh.devstack.stack import sluice_command

    result = subprocess.run([*sluice_command(), "status", "--etcd", stack.etcd_endpoint, "--prefix",
                             stack.config.prefix], capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.strip() or result.stderr.strip()


def _next_steps(stack: Any) -> str:
    metrics = "\n".join(f"  {url}" for url in stack.metrics_urls)
    return f"""Metrics (Prometheus):
{metrics}

Next, in another terminal (README.md has the whole tour):
  eval "$(.venv/bin/sluice env)"                        # this stack's addresses for the commands below
  .venv/bin/python examples/client.py --url $SLUICE_GATEWAY --model iris
  .venv/bin/sluice weights set iris 1=90 2=10           # canary: 10 % of iris traffic to version 2
  .venv/bin/sluice status iris                          # configured vs effective weights
  .venv/bin/sluice traces --last 1                      # the last request's trace, Envoy to ONNX Runtime
Press Ctrl-C to stop everything."""


def run_env(args: argparse.Namespace) -> int:
    import shlex

    from mesh.devstack.stack import read_state

    state = read_state(args.run_dir)
    if not state.get("gateway"):
        print(f"echo 'sluice env: no running sluice up in {args.run_dir}' >&2; false")
        return 1
    exports = {
        "SLUICE_GATEWAY": state["gateway"],
        "SLUICE_ETCD_ENDPOINTS": state["etcd"],
        "SLUICE_ETCD_PREFIX": state.get("prefix", "/sluice/"),
        "SLUICE_REPO": state.get("repo", ""),
        "SLUICE_ENVOY_ADMIN": state.get("envoy_admin", ""),
    }
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(str(value))}")
    metrics = state.get("metrics") or []
    if isinstance(metrics, list):
        print(f"export SLUICE_METRICS={shlex.quote(' '.join(str(m) for m in metrics))}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from mesh.devstack.stack import read_state

    state = read_state(args.run_dir)
    pid = state.get("pid")
    if not isinstance(pid, int):
        print(f"sluice down: no running `sluice up` found in {args.run_dir}")
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"sluice down: process {pid} is gone; nothing to stop")
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("sluice down: stopped")
            return 0
        time.sleep(0.2)
    print(f"sluice down: process {pid} still running after {args.timeout:.0f}s")
    return 1


def register_traces(subparsers: Any) -> None:
    traces = subparsers.add_parser(
        "traces", help="show traces recorded by `sluice up` (Envoy → service → queue → ONNX Runtime)",
        description="Prints the traces in <run-dir>/traces.jsonl as trees, newest last.")
    traces.add_argument("trace_id", nargs="?", help="only this trace")
    traces.add_argument("--last", type=int, default=3, help="how many of the newest traces (default 3)")
    traces.add_argument("--run-dir", type=Path, default=Path(".sluice"))
    traces.set_defaults(func=run_traces)


def run_traces(args: argparse.Namespace) -> int:
    from mesh.observability.traces import read_spans, render_trace, traces

    path = args.run_dir / "traces.jsonl"
    if not path.exists():
        print(f"sluice traces: no {path}; start the stack with `sluice up` (traces are on by default)")
        return 1
    grouped = traces(read_spans(path))
    if args.trace_id:
        spans = grouped.get(args.trace_id)
        if not spans:
            print(f"sluice traces: no trace {args.trace_id} in {path}")
            return 1
        print(render_trace(args.trace_id, spans))
        return 0
    if not grouped:
        print(f"sluice traces: {path} has no spans yet; send a request through the gateway")
        return 1
    # Only traces that went through the gateway: those are the requests.
    requests = [(tid, spans) for tid, spans in grouped.items() if any(s.service == "sluice-gateway" for s in spans)]
    for trace_id, spans in requests[-args.last:]:
        print(render_trace(trace_id, spans))
        print()
    return 0
