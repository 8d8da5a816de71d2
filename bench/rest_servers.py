"""The HTTP server of the REST path, chosen by measurement: uvicorn+httptools against granian, one run.

Both serve the *same* sluice REST application (services/rest/app.py) over the same model service
(gRPC port, batcher, validation) in the service's own event loop:

* ``uvicorn + httptools``: ``sluice serve`` itself (services/rest/server.py);
* ``granian``: ``python -m bench.rest_granian``, the same ModelServer with granian's embedded server
  in place of uvicorn (granian from ``bench/.venvs/granian``, made by ``python -m bench --setup-only``;
  skipped with the reason when missing);
* ``REST off``: ``sluice serve --rest-port -1``, the gRPC reference.

The same load generator for all: h2load over HTTP/1.1 (``--h1``; C keep-alive connections, one
request in flight on each) posting a pre-encoded ``/v2/models/MODEL/infer`` body, JSON (``data``
arrays) or Triton's binary extension (the exact bytes tritonclient.http sends), at each
concurrency; and h2load over HTTP/2 with a pre-framed ModelInfer for gRPC. Every server is pinned
to the server core, h2load to the client core (as ``python -m bench``). Before measuring, each
server answers one tritonclient.http call and one raw POST of the benchmark bytes exactly as
in-process onnxruntime; after each run h2load's average answer must be that answer's size (±2 %),
with no failed request and no non-2xx status.

Rounds interleave the servers (the order reverses every round); each cell is the median over the
rounds and the comparisons are paired by round. The gRPC part asks whether the REST path slows
the gRPC path: gRPC at c=1 and the highest concurrency on each server with its REST port idle (and
with REST off), then gRPC at the highest concurrency while a REST load of that concurrency runs on
the same service (both share the one server core: the question is what each HTTP server leaves
gRPC, and how much work the two protocols get done together).

    python -m bench.rest_servers [--model mlp] [--concurrency 1,32] [--duration 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/rest_servers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnxruntime as ort

from bench import loadgen
from bench.cpu import autogroup_nice, clock_ticks_per_second, group_ticks, set_autogroup_nice
from bench.targets import SLUICE_BIN, VENVS, ServerProcess, spawn
from examples.build_models import build_all
from mesh.ports import free_port

GRANIAN_DIR = VENVS / "granian"
"""``pip install --target`` folder holding granian (bench only: no dependency of sluice)."""
SIZE_TOLERANCE = 0.02
UVICORN, GRANIAN, REST_OFF = "uvicorn + httptools", "granian", "REST off"


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    """CPU time of the server's process group per request (µs), user + system."""
    other_rps: float = 0.0
    """REST requests per second meanwhile, in the mixed runs (gRPC under REST load)."""


@dataclass
class Server:
    name: str
    grpc_port: int
    rest_port: int | None
    process: ServerProcess | None = None
    skipped: str = ""
    """Why this server does not run here (empty: it runs)."""
    rest_bytes: dict[str, int] = field(default_factory=dict)
    """kind -> size of one correct REST answer."""
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)
    """(what, concurrency) -> one sample per round; what is json, binary, grpc or grpc+rest."""

    def median(self, what: str, concurrency: int, attribute: str) -> float:
        values = [float(getattr(s, attribute)) for s in self.samples.get((what, concurrency), [])]
        return statistics.median(values) if values else float("nan")

    def paired(self, other: Server, what: str, concurrency: int, attribute: str, *, ratio: bool = False) -> float:
        """Median over the rounds of this server's value minus (or over) ``other``'s in the same round."""
        mine, theirs = self.samples.get((what, concurrency), []), other.samples.get((what, concurrency), [])
        if not mine or len(mine) != len(theirs):
            return float("nan")
        pairs = [(float(getattr(a, attribute)), float(getattr(b, attribute)))
                 for a, b in zip(mine, theirs, strict=True)]
        return statistics.median(a / b if ratio else a - b for a, b in pairs)


# ---------------------------------------------------------------------------------------- servers


def model_repo(workdir: Path, model: str) -> Path:
    """A repository holding only ``model`` (version 1 and its config), built fresh."""
    build_all(workdir / "built")
    repo = workdir / "repo"
    shutil.copytree(workdir / "built" / model, repo / model)
    return repo


def granian_unavailable() -> str:
    if not (GRANIAN_DIR / "granian").is_dir():
        return f"granian not installed in {GRANIAN_DIR}: run `python -m bench --setup-only`"
    return ""


def start_server(server: Server, repo: Path, workdir: Path, args: argparse.Namespace) -> None:
    log = workdir / "logs" / f"{server.name.split()[0].lower()}.log"
    common = ["--repo", str(repo), "--port", str(server.grpc_port), "--log-level", "warning"]
    env: dict[str, str] = {}
    if server.name == GRANIAN:
        cmd = [sys.executable, "-m", "bench.rest_granian", *common, "--rest-port", str(server.rest_port),
               "--runtime-threads", str(args.granian_threads)]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GRANIAN_DIR), os.environ.get("PYTHONPATH", "")) if p)
    else:
        rest = str(server.rest_port) if server.rest_port is not None else "-1"
        cmd = [str(SLUICE_BIN), "serve", *common, "--rest-port", rest, "--metrics-port", "-1"]
    server.process = spawn(server.name, cmd, log, server.grpc_port, cpu=args.server_cpu, nice=args.nice, env=env)


# ------------------------------------------------------------------------------------ measurement


def _checked(server: Server, result: loadgen.H2Result, expected_bytes: int, concurrency: int) -> str:
    """Why a run does not count (empty: it counts)."""
    if not result.ok:
        return result.message
    if result.failed or result.not_2xx:
        return f"{result.failed} failed, {result.not_2xx} non-2xx answers"
    if not result.answers_are(expected_bytes, concurrency, SIZE_TOLERANCE):
        return (f"average answer {result.avg_response_bytes:.0f} B, a correct one is {expected_bytes} B: "
                "errors counted as successes?")
    died = server.process.died() if server.process else None
    return died or ""


def _load(server: Server, what: str, ctx: Context) -> tuple[int, Path, loadgen.Protocol]:
    if what == "grpc":
        return server.grpc_port, ctx.bodies["grpc"], loadgen.GRPC
    assert server.rest_port is not None
    return server.rest_port, ctx.bodies[what], ctx.rest[what].protocol(ctx.model)


def measure(server: Server, what: str, concurrency: int, ctx: Context) -> Sample:
    port, body_path, protocol = _load(server, what, ctx)
    assert server.process is not None
    ticks = clock_ticks_per_second()
    before = group_ticks(server.process.proc.pid)
    # The CPU count spans the warm-up too: rates come from the measured run, so count both.
    started = time.monotonic()
    result = loadgen.run_h2load(port, body_path, concurrency, ctx.args.duration, cpu=ctx.args.client_cpu,
                                nice=ctx.args.nice, protocol=protocol,
                                log_path=ctx.log_dir / f"{server.name.split()[0]}-{what}-c{concurrency}.tsv")
    wall = time.monotonic() - started
    cpu_s = (group_ticks(server.process.proc.pid) - before) / ticks
    expected = ctx.grpc_bytes if what == "grpc" else server.rest_bytes[what]
    problem = _checked(server, result, expected, concurrency)
    if problem:
        raise SystemExit(f"{server.name} {what} c={concurrency}: {problem}")
    requests = result.succeeded * wall / max(result.seconds, 1e-9)  # warm-up included, at the measured rate
    return Sample(result.rps, result.p50_ms, result.p99_ms, cpu_s / max(requests, 1) * 1e6)


def measure_mixed(server: Server, concurrency: int, ctx: Context) -> Sample:
    """gRPC at ``concurrency`` while a REST load (``ctx.args.mixed_body``) of that concurrency runs."""
    assert server.rest_port is not None and server.process is not None
    kind = ctx.args.mixed_body
    rest_log = ctx.log_dir / f"{server.name.split()[0]}-mixed-rest-c{concurrency}.tsv"
    # Long enough to cover the gRPC run's warm-up and measurement.
    rest_cmd = loadgen.h2load_command(server.rest_port, ctx.bodies[kind], concurrency,
                                      duration=ctx.args.duration + 3, log_path=rest_log, cpu=ctx.args.client_cpu,
                                      nice=ctx.args.nice, protocol=ctx.rest[kind].protocol(ctx.model))
    background = subprocess.Popen(rest_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        result = loadgen.run_h2load(server.grpc_port, ctx.bodies["grpc"], concurrency, ctx.args.duration,
                                    cpu=ctx.args.client_cpu, nice=ctx.args.nice,
                                    log_path=ctx.log_dir / f"{server.name.split()[0]}-mixed-grpc-c{concurrency}.tsv")
        output, _ = background.communicate(timeout=ctx.args.duration + 60)
    finally:
        if background.poll() is None:
            background.kill()
            background.wait(timeout=10)
    problem = _checked(server, result, ctx.grpc_bytes, concurrency)
    problem = f"gRPC: {problem}" if problem else ""
    rest = loadgen.parse_h2load(background.returncode, output, rest_log)
    rest_problem = _checked(server, rest, server.rest_bytes[kind], concurrency)
    if rest_problem:
        tail = " | ".join(output.strip().splitlines()[-6:])
        problem = f"{problem}; " if problem else ""
        problem += f"REST {kind}: {rest_problem} (h2load: {tail})"
    if problem:
        raise SystemExit(f"{server.name} gRPC under REST load c={concurrency}: {problem}")
    return Sample(result.rps, result.p50_ms, result.p99_ms, float("nan"), other_rps=rest.rps)


@dataclass
class Context:
    args: argparse.Namespace
    model: str
    bodies: dict[str, Path]
    rest: dict[str, loadgen.RestBody]
    grpc_bytes: int
    log_dir: Path


# ---------------------------------------------------------------------------------------- tables


def _f(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)  # NaN: not measured


def render_rest(servers: list[Server], kinds: list[str], concurrencies: list[int]) -> str:
    """One row per (server, body): p50 at the lowest concurrency, req/s at each, CPU per request,
    and the ratios to uvicorn paired by round."""
    low, high = min(concurrencies), max(concurrencies)
    base = next((s for s in servers if s.name == UVICORN), None)
    head = (f"| server | body | c={low} p50 ms | c={low} p99 ms | "
            + " | ".join(f"c={c} req/s" for c in concurrencies)
            + (f" | c={high} p50 ms" if high != low else "")
            + " | server CPU µs/req (" + " / ".join(f"c={c}" for c in concurrencies) + ")"
            + f" | c={low} p50 vs uvicorn | c={high} req/s vs uvicorn |")
    lines = [head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for kind in kinds:
        for server in servers:
            if server.rest_port is None:
                continue
            if server.skipped:
                lines.append(f"| {server.name} | {kind} | skipped: {server.skipped} |")
                continue
            cells = [_f(server.median(kind, low, "p50_ms"), ".3f"), _f(server.median(kind, low, "p99_ms"), ".3f")]
            cells += [_f(server.median(kind, c, "rps"), ",.0f") for c in concurrencies]
            if high != low:
                cells.append(_f(server.median(kind, high, "p50_ms"), ".2f"))
            cells.append(" / ".join(_f(server.median(kind, c, "cpu_us"), ".0f") for c in concurrencies))
            if base is None or base is server or base.skipped:
                cells += ["", ""]
            else:
                cells.append(f"{_f(server.paired(base, kind, low, 'p50_ms'), '+.3f')} ms")
                cells.append(f"{_f(server.paired(base, kind, high, 'rps', ratio=True), '.2f')}x")
            lines.append(f"| {server.name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_grpc(servers: list[Server], concurrencies: list[int], mixed_body: str) -> str:
    """gRPC on each server with its REST port idle, and under a REST load, against REST off."""
    low, high = min(concurrencies), max(concurrencies)
    off = next((s for s in servers if s.name == REST_OFF), None)
    lines = [
        f"| service | gRPC c={low} p50 ms | vs REST off (paired) | gRPC c={high} req/s | vs REST off "
        f"| gRPC c={high} req/s under REST {mixed_body} c={high} | REST req/s meanwhile | gRPC + REST req/s "
        f"| gRPC kept (under load / idle) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server in servers:
        label = f"{server.name}, REST port idle" if server.rest_port is not None else server.name
        if server.skipped:
            lines.append(f"| {label} | skipped: {server.skipped} |")
            continue
        cells = [_f(server.median("grpc", low, "p50_ms"), ".3f")]
        compare = off is not None and off is not server
        cells.append(f"{_f(server.paired(off, 'grpc', low, 'p50_ms'), '+.3f')} ms" if compare and off else "")
        cells.append(_f(server.median("grpc", high, "rps"), ",.0f"))
        cells.append(f"{_f(server.paired(off, 'grpc', high, 'rps', ratio=True), '.2f')}x" if compare and off else "")
        if server.rest_port is not None and ("grpc+rest", high) in server.samples:
            grpc_mixed = server.median("grpc+rest", high, "rps")
            rest_mixed = server.median("grpc+rest", high, "other_rps")
            total = statistics.median(s.rps + s.other_rps for s in server.samples[("grpc+rest", high)])
            # Same round: gRPC under the REST load over gRPC alone on this service.
            kept = statistics.median(m.rps / i.rps for m, i in zip(
                server.samples[("grpc+rest", high)], server.samples[("grpc", high)], strict=True))
            cells += [_f(grpc_mixed, ",.0f"), _f(rest_mixed, ",.0f"), _f(total, ",.0f"), f"{kept:.2f}x"]
        else:
            cells += ["", "", "", ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rest_servers", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", help="model from examples/build_models.py (default mlp)")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated (default 1,32)")
    parser.add_argument("--bodies", default="json,binary", help="REST bodies: json,binary (default both)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per h2load run (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--mixed-body", default="json", choices=loadgen.REST_KINDS,
                        help="REST body of the load beside gRPC (default json)")
    parser.add_argument("--granian-threads", type=int, default=1, help="granian's Rust runtime threads (default 1)")
    parser.add_argument("--server-cpu", default="0", help="taskset core list for servers ('' = no pinning)")
    parser.add_argument("--client-cpu", default="1", help="taskset core list for h2load ('' = no pinning)")
    parser.add_argument("--nice", type=int, default=0, help="nice value for servers and h2load (needs root if < 0)")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds a server may take to start")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    args.bodies = [b.strip() for b in args.bodies.split(",") if b.strip()]
    unknown = [b for b in args.bodies if b not in loadgen.REST_KINDS]
    if unknown or not args.concurrency or min(args.concurrency) < 1:
        parser.error(f"bodies must be from {loadgen.REST_KINDS} and concurrencies positive")
    args.server_cpu = args.server_cpu or None
    args.client_cpu = args.client_cpu or None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if loadgen.h2load_path() is None:
        print("h2load not found: `python -m bench --setup-only` (apt package nghttp2-client)", file=sys.stderr)
        return 2
    # h2load runs in this process's session: raise its autogroup with the servers' (as python -m bench).
    saved_nice = autogroup_nice("self") if args.nice else None
    if args.nice:
        set_autogroup_nice("self", args.nice)
    try:
        return _run(args)
    finally:
        if saved_nice is not None:
            set_autogroup_nice("self", saved_nice)


def _run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sluice-rest-servers-"))
    servers = [Server(UVICORN, free_port(), free_port()), Server(GRANIAN, free_port(), free_port()),
               Server(REST_OFF, free_port(), None)]
    servers[1].skipped = granian_unavailable()
    running = [s for s in servers if not s.skipped]
    try:
        repo = model_repo(workdir, args.model)
        session = ort.InferenceSession(str(repo / args.model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1000)
        dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}
        inputs = {a.name: rng.standard_normal([1 if i == 0 else int(d) for i, d in enumerate(a.shape)])
                  .astype(dtypes[a.type]) for a in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, inputs), strict=True))
        grpc_body = loadgen.encode_request(args.model, inputs)
        bodies = {"grpc": workdir / "grpc.bin"}
        bodies["grpc"].write_bytes(loadgen.grpc_frame(grpc_body))
        rest = {kind: loadgen.encode_rest(inputs, kind) for kind in loadgen.REST_KINDS}
        for kind, body in rest.items():
            bodies[kind] = workdir / f"rest-{kind}.bin"
            bodies[kind].write_bytes(body.body)
        for server in running:
            start_server(server, repo, workdir, args)
        for server in running:
            assert server.process is not None
            error = loadgen.wait_until_serving(server.grpc_port, grpc_body, args.startup_timeout,
                                               alive=server.process.died)
            if not error and server.rest_port is not None:
                error = loadgen.wait_until_rest(server.rest_port, args.model, rest["json"], 60,
                                                alive=server.process.died)
            if error:
                raise SystemExit(f"{server.name} did not start: {error} (log {server.process.log_path})")
        check = loadgen.check_target(running[0].grpc_port, args.model, inputs, expected, grpc_body)
        if not check.ok:
            raise SystemExit(f"gRPC check: {check.message}")
        for server in running:
            if server.rest_port is None:
                continue
            for kind in loadgen.REST_KINDS:
                result = loadgen.check_rest(server.rest_port, args.model, inputs, expected, rest[kind])
                if not result.ok:
                    raise SystemExit(f"{server.name}: {result.message}")
                server.rest_bytes[kind] = result.response_bytes
        ctx = Context(args, args.model, bodies, rest, check.response_bytes, workdir / "h2load")
        ctx.log_dir.mkdir()
        load_before = os.getloadavg()
        high = max(args.concurrency)
        for index in range(args.rounds):
            order = running if index % 2 == 0 else running[::-1]
            plan = [(s, kind, c) for c in args.concurrency for kind in args.bodies for s in order
                    if s.rest_port is not None]
            plan += [(s, "grpc", c) for c in args.concurrency for s in order]
            plan += [(s, "grpc+rest", high) for s in order if s.rest_port is not None]
            for server, what, concurrency in plan:
                if what == "grpc+rest":
                    sample = measure_mixed(server, concurrency, ctx)
                    extra = f", REST meanwhile {sample.other_rps:,.0f} req/s"
                else:
                    sample = measure(server, what, concurrency, ctx)
                    extra = f", {sample.cpu_us:.0f} µs CPU/req"
                server.samples.setdefault((what, concurrency), []).append(sample)
                print(f"round {index + 1} {server.name} {what} c={concurrency}: {sample.rps:,.0f} req/s "
                      f"p50 {sample.p50_ms:.3f} ms{extra}", flush=True)
        load_after = os.getloadavg()
        nice = f" --nice {args.nice}" if args.nice else ""
        print(f"\nCommand: `python -m bench.rest_servers --model {args.model} --concurrency "
              f"{','.join(map(str, args.concurrency))} --bodies {','.join(args.bodies)} --duration "
              f"{args.duration:g} --rounds {args.rounds} --mixed-body {args.mixed_body}{nice}`")
        print(f"{args.model}, batch 1, {args.rounds} rounds x {args.duration:g} s per point (median; comparisons "
              f"paired by round), servers on core {args.server_cpu}, h2load on core {args.client_cpu}, "
              f"{os.cpu_count()} cores, load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
              f"REST: HTTP/1.1, C connections; gRPC: 1 HTTP/2 connection, C streams\n")
        print(render_rest(servers, args.bodies, args.concurrency))
        print()
        print(render_grpc(servers, args.concurrency, args.mixed_body))
        return 0
    finally:
        for server in running:
            if server.process is not None:
                server.process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
