"""Benchmark the same ONNX models on several servers in one run and print a Markdown table.

Targets (``--targets``):
  ort       in-process onnxruntime, ``session.run`` in a loop, 1 thread (no server, no network)
  floor     bare grpc.aio server answering ModelInfer with a canned response (Python gRPC upper bound)
  sluice    ``sluice serve --repo DIR --port P --metrics-port 0``
  mlserver  Seldon MLServer 1.7 + a custom onnxruntime runtime (bench/.venvs/mlserver)
  pytriton  NVIDIA PyTriton 0.7 + an onnxruntime callable, dynamic batching (bench/.venvs/pytriton)

Load: h2load, one HTTP/2 connection with CONC concurrent streams, posting a pre-encoded gRPC
ModelInfer body. Servers are pinned to core 0 and h2load to core 1 (``--server-cpu``/``--client-cpu``).
With ``--rest json,binary`` the servers with a KServe v2 REST port (sluice, mlserver, pytriton) are
also measured over HTTP/1.1 (``h2load --h1``, CONC connections), JSON and binary-extension bodies.

    python -m bench --setup                      # peer venvs + h2load, once
    python -m bench                              # all targets, mlp+heavy, concurrency 1,8,32, 5 s each
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnxruntime as ort

from bench import cpu, loadgen
from bench.cpu import single_core
from bench.targets import (
    ALL_TARGETS,
    BENCH_DIR,
    REPO_ROOT,
    SERVER_TARGETS,
    VENVS,
    MLServerTarget,
    RunContext,
    ServerProcess,
    Target,
    TargetError,
)
from examples.build_models import build_all

ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}
# Average response size seen by h2load may differ this much from one correct response (rounding only).
SIZE_TOLERANCE = 0.02
PEER_PACKAGES = {
    "mlserver": ["mlserver==1.7.*", "uvloop==0.21.0", f"onnxruntime=={ort.__version__}", "numpy"],
    "pytriton": ["nvidia-pytriton==0.7.*", f"onnxruntime=={ort.__version__}", "numpy"],
}
GRANIAN_PACKAGES = ["granian==2.8.*"]
"""For bench.rest_servers only, into a ``pip install --target`` folder (bench/.venvs/granian): the
sluice REST app under granian runs on .venv's interpreter with that folder on its PYTHONPATH."""
REST_LABELS = {"json": "REST JSON", "binary": "REST binary"}


@dataclass
class Point:
    """One cell group of the table: a target serving a model at a concurrency."""

    target: str
    model: str
    concurrency: int
    status: str  # ok | failed | skipped
    rps: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    requests: int = 0
    server_other: float = math.nan  # share of the server core used by other processes meanwhile
    client_other: float = math.nan  # share of the client core used by others than h2load
    note: str = ""
    round: int = 0
    protocol: str = "grpc"  # grpc | json | binary (KServe v2 REST bodies)


@dataclass
class ModelCase:
    name: str
    path: Path
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    body: bytes  # serialized ModelInferRequest
    body_path: Path  # gRPC-framed body for h2load
    rest: dict[str, loadgen.RestBody] = field(default_factory=dict)  # REST bodies by kind (json, binary)
    rest_paths: dict[str, Path] = field(default_factory=dict)  # the same bytes in files for h2load


# --------------------------------------------------------------------------------------------- setup


def _base_python() -> str:
    """The interpreter this venv was made from (peer venvs need a shared libpython: PyTriton)."""
    candidate = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(candidate) if candidate.exists() else sys.executable


def _run_step(cmd: list[str], timeout: float) -> bool:
    print(f"[setup] $ {shlex.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"[setup] timed out after {timeout:.0f}s", flush=True)
        return False
    if proc.returncode != 0:
        print(f"[setup] failed with exit code {proc.returncode}", flush=True)
    return proc.returncode == 0


def setup(peers: list[str], granian: bool = True) -> int:
    """apt-get install h2load if missing; create/refresh the peer venvs (and granian's folder, for
    bench.rest_servers). Returns an exit code."""
    ok = True
    if loadgen.h2load_path() is None:
        if os.geteuid() != 0:
            print("[setup] h2load missing: run `sudo apt-get update && sudo apt-get install -y nghttp2-client`")
            ok = False
        else:
            ok = _run_step(["apt-get", "update"], 600) and _run_step(
                ["apt-get", "install", "-y", "--no-install-recommends", "nghttp2-client"], 600
            )
    else:
        print(f"[setup] h2load present: {loadgen.h2load_path()}")
    base = _base_python()
    for peer in peers:
        venv = VENVS / peer
        if not (venv / "bin" / "python").exists() and not _run_step([base, "-m", "venv", str(venv)], 300):
            ok = False
            continue
        ok = _run_step([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PEER_PACKAGES[peer]], 1800) and ok
    if granian:
        ok = _run_step([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(VENVS / "granian"),
                        *GRANIAN_PACKAGES], 900) and ok
    print("[setup] done" if ok else "[setup] finished with errors (see above)")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ helpers


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def prepare_cases(repo: Path, models: list[str], batch: int, workdir: Path) -> dict[str, ModelCase]:
    """Seeded inputs, onnxruntime's outputs for them, and the request bodies / canned responses."""
    cases = {}
    for index, name in enumerate(models):
        path = repo / name / "1" / "model.onnx"
        session = _session(path)
        rng = np.random.default_rng(1000 + index)
        inputs = {}
        for arg in session.get_inputs():
            dims = [batch if i == 0 else int(d) for i, d in enumerate(arg.shape)]
            inputs[arg.name] = rng.standard_normal(dims).astype(ORT_TO_NUMPY[arg.type])
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, inputs), strict=True))
        body = loadgen.encode_request(name, inputs)
        body_path = workdir / f"{name}.body.bin"
        body_path.write_bytes(loadgen.grpc_frame(body))
        (workdir / f"{name}.response.bin").write_bytes(loadgen.encode_response(name, expected))
        for arg_name, array in inputs.items():
            np.save(workdir / f"{name}.{arg_name}.npy", array)
        rest = {kind: loadgen.encode_rest(inputs, kind) for kind in loadgen.REST_KINDS}
        rest_paths = {kind: workdir / f"{name}.rest-{kind}.bin" for kind in rest}
        for kind, rest_body in rest.items():
            rest_paths[kind].write_bytes(rest_body.body)
        cases[name] = ModelCase(name, path, inputs, expected, body, body_path, rest, rest_paths)
    return cases


IDLE_GAP_US = 300
"""The ``ort-idle`` point: in-process calls each after this long idle (a server at concurrency 1)."""


def run_ort(case: ModelCase, args: argparse.Namespace, workdir: Path, rows: int = 0, gap_us: int = 0) -> Point:
    """In-process baseline in a child pinned to the server core; ``--repeat`` runs, fastest kept.

    With ``rows``, every call runs one batch of that many rows and req/s counts rows: the model's
    cost per row when batched, which with the floor gives a server's bound (see render_bounds).
    With ``gap_us``, the core idles that long before every call (target ``ort-idle``)."""
    cmd = cpu.launch_prefix(args.server_cpu, args.nice)
    cmd += [sys.executable, "-m", "bench.ort_inproc", "--model", str(case.path), "--duration", f"{args.duration:g}"]
    if rows:
        cmd += ["--rows", str(rows)]
    if gap_us:
        cmd += ["--gap-us", str(gap_us)]
    target = "ort-idle" if gap_us else "ort"
    for arg_name in case.inputs:
        cmd += ["--input", f"{arg_name}={workdir / f'{case.name}.{arg_name}.npy'}"]
    best: dict[str, float] | None = None
    for _ in range(args.repeat):
        _quiet(args)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.duration + 120, check=False, cwd=REPO_ROOT
            )
        except subprocess.TimeoutExpired:
            return Point(target, case.name, 1, "failed", note="in-process run timed out")
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
            return Point(target, case.name, 1, "failed", note=f"rc={proc.returncode}: {tail}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        if best is None or data["rps"] > best["rps"]:
            best = data
    assert best is not None
    note = "in-process session.run, 1 thread" + (f", best of {args.repeat}" if args.repeat > 1 else "")
    if rows:
        note += f"; {rows}-row batches, req/s = rows/s, p50 per call"
    if gap_us:
        note += f"; {gap_us} µs idle before each call (not counted in req/s)"
    return Point(
        target,
        case.name,
        rows or 1,
        "ok",
        rps=best["rps"],
        p50_ms=best["p50_ms"],
        p99_ms=best["p99_ms"],
        requests=int(best["calls"]),
        server_other=float(best.get("other_load", math.nan)),
        note=note,
    )


def _quiet(args: argparse.Namespace) -> None:
    """Bounded wait for the pinned cores to be idle (``--quiet-wait``), so others' work skews less."""
    cores = [c for c in (single_core(args.server_cpu), single_core(args.client_cpu)) if c is not None]
    cpu.wait_for_quiet(cores, args.quiet_wait)


def measure_point(
    server: ServerProcess, case: ModelCase, concurrency: int, args: argparse.Namespace, workdir: Path,
    *, protocol: str = "grpc",
) -> Point:
    """Check the answer, then run h2load ``--repeat`` times and keep the fastest run.

    ``protocol`` ``grpc``: ModelInfer on the gRPC port (1 HTTP/2 connection, CONC streams); ``json``
    or ``binary``: the KServe v2 REST inference on the HTTP port (HTTP/1.1, CONC connections)."""
    point = Point(server.name, case.name, concurrency, "failed", protocol=protocol)
    if protocol == "grpc":
        port, body_path, h2_protocol = server.port, case.body_path, loadgen.GRPC
        check = loadgen.check_target(server.port, case.name, case.inputs, case.expected, case.body)
    else:
        if server.http_port is None:
            point.status, point.note = "skipped", "no REST port"
            return point
        port, body_path = server.http_port, case.rest_paths[protocol]
        h2_protocol = case.rest[protocol].protocol(case.name)
        check = loadgen.check_rest(server.http_port, case.name, case.inputs, case.expected, case.rest[protocol])
    if not check.ok:
        point.note = f"check before run: {check.message}"
        return point
    server_core = single_core(args.server_cpu)
    best: loadgen.H2Result | None = None
    for attempt in range(args.repeat):
        _quiet(args)
        log_path = workdir / "logs" / f"h2load-{server.name}-{protocol}-{case.name}-c{concurrency}-{attempt}.tsv"
        probe = cpu.CoreProbe(server_core, server.proc.pid) if server_core is not None else None
        result = loadgen.run_h2load(
            port,
            body_path,
            concurrency,
            args.duration,
            log_path=log_path,
            cpu=args.client_cpu,
            nice=args.nice,
            server_probe=probe,
            protocol=h2_protocol,
        )
        if not result.ok:
            point.note = result.message
            return point
        avg = result.avg_response_bytes
        if not result.answers_are(check.response_bytes, concurrency, SIZE_TOLERANCE):
            point.note = (
                f"h2load's average response is {avg:.0f} B but a correct one is {check.response_bytes} B: "
                "errors counted as successes?"
            )
            return point
        if result.failed or result.not_2xx:
            point.note = f"{result.failed} requests failed/errored/timed out, {result.not_2xx} non-2xx answers"
            return point
        if best is None or result.rps > best.rps:
            best = result
    died = server.died()
    if died or best is None:
        point.note = f"server died during the run: {died}"
        return point
    point.rps, point.p50_ms, point.p99_ms = best.rps, best.p50_ms, best.p99_ms
    point.requests, point.server_other, point.client_other = (
        best.succeeded,
        best.server_core_other,
        best.client_core_other,
    )
    point.status = "ok"
    point.note = f"resp {check.response_bytes} B ok" + (f", best of {args.repeat}" if args.repeat > 1 else "")
    return point


def bench_target(
    target: Target, cases: dict[str, ModelCase], ctx: RunContext, args: argparse.Namespace, points: list[Point]
) -> None:
    """Start one server, measure every (model, concurrency) into ``points``, always stop it."""
    combos = [(m, c) for m in cases for c in args.concurrency]
    kinds = ["grpc", *(args.rest if target.rest else [])]
    try:
        reason = target.unavailable()
    except Exception as exc:  # a broken install must not end the whole run
        reason = f"availability check failed: {type(exc).__name__}: {exc}"
    if reason:
        print(f"[{target.name}] skipped: {reason}", flush=True)
        points += [Point(target.name, m, c, "skipped", note=reason, protocol=k) for k in kinds for m, c in combos]
        return
    server: ServerProcess | None = None
    started = time.monotonic()
    try:
        print(f"[{target.name}] starting ...", flush=True)
        server = target.start(ctx)
        first = next(iter(cases.values()))
        error = loadgen.wait_until_serving(server.port, first.body, ctx.startup_timeout, alive=server.died)
        if error:
            raise TargetError(f"did not start: {error} (log: {server.log_path})")
        print(f"[{target.name}] serving on :{server.port} after {time.monotonic() - started:.1f}s", flush=True)
        for model, concurrency in combos:
            case = cases[model]
            error = loadgen.wait_until_serving(server.port, case.body, 60, alive=server.died)
            if error:
                points.append(Point(target.name, model, concurrency, "failed", note=error))
                continue
            point = measure_point(server, case, concurrency, args, ctx.workdir)
            print(
                f"[{target.name}] {model:<6} c={concurrency:<3} {point.status:<6} {point.rps:9.1f} req/s  "
                f"p50 {point.p50_ms:7.3f} ms  p99 {point.p99_ms:7.3f} ms  {point.note}",
                flush=True,
            )
            points.append(point)
        for kind in args.rest if target.rest else []:
            for model, concurrency in combos:
                case = cases[model]
                assert server.http_port is not None
                error = loadgen.wait_until_rest(server.http_port, model, case.rest["json"], 60, alive=server.died)
                point = (Point(target.name, model, concurrency, "failed", note=error, protocol=kind) if error
                         else measure_point(server, case, concurrency, args, ctx.workdir, protocol=kind))
                print(
                    f"[{target.name}] {model:<6} c={concurrency:<3} {REST_LABELS[kind]:<11} {point.status:<6} "
                    f"{point.rps:9.1f} req/s  p50 {point.p50_ms:7.3f} ms  p99 {point.p99_ms:7.3f} ms  {point.note}",
                    flush=True,
                )
                points.append(point)
    except Exception as exc:  # TargetError, or anything unexpected: report it in the table, go on
        if not isinstance(exc, TargetError):
            exc = TargetError(f"{type(exc).__name__}: {exc}")
        print(f"[{target.name}] failed: {exc}", flush=True)
        done = {(p.model, p.concurrency, p.protocol) for p in points if p.target == target.name}
        points += [Point(target.name, m, c, "failed", note=str(exc), protocol=k)
                   for k in kinds for m, c in combos if (m, c, k) not in done]
    finally:
        if server is not None:
            server.stop()


# -------------------------------------------------------------------------------------------- table


def _cell(text: str, limit: int) -> str:
    """``text`` fit for one Markdown table cell: one line, no ``|``, at most ``limit`` characters."""
    return " ".join(text.split()).replace("|", "/")[:limit]


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


def _ratio(value: float, ref: Point | None) -> str:
    if ref is None or ref.status != "ok" or math.isnan(value) or not ref.rps:
        return "-"
    return f"{value / ref.rps:.2f}x"


def _table_targets(selected: list[str]) -> list[str]:
    """Row order: ALL_TARGETS', with the idle-core in-process rows after the in-process ones."""
    order = [t for t in ALL_TARGETS if t in selected]
    return [u for t in order for u in ((t, "ort-idle") if t == "ort" else (t,))]


def render_table(points: list[Point], targets: list[str], labels: dict[str, str]) -> str:
    by_key = {(p.target, p.model, p.concurrency): p for p in points}
    models = list(dict.fromkeys(p.model for p in points))
    concurrencies = sorted({p.concurrency for p in points})
    lines = [
        "| model | conc | target | req/s | p50 ms | p99 ms | vs floor | vs PyTriton | vs MLServer "
        "| others' CPU srv/cli | notes |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model in models:
        for conc in concurrencies:
            floor = by_key.get(("floor", model, conc))
            pytriton = by_key.get(("pytriton", model, conc))
            mlserver = by_key.get(("mlserver", model, conc))
            for target in targets:
                p = by_key.get((target, model, conc))
                if p is None:
                    continue
                label = labels.get(target, target)
                if p.status != "ok":
                    note = _cell(p.note, 160)
                    lines.append(f"| {model} | {conc} | {label} | {p.status} | | | | | | | {note} |")
                    continue
                lines.append(
                    f"| {model} | {conc} | {label} | {_fmt(p.rps, 0)} | {_fmt(p.p50_ms, 3)} | "
                    f"{_fmt(p.p99_ms, 3)} | {_ratio(p.rps, floor)} | {_ratio(p.rps, pytriton)} | "
                    f"{_ratio(p.rps, mlserver)} | {_pct(p.server_other)}/{_pct(p.client_other)} | {p.note} |"
                )
    return "\n".join(lines)


def render_rest_table(points: list[Point], targets: list[str], labels: dict[str, str], kinds: list[str]) -> str:
    """REST rows: per model and concurrency, each body kind on each server, with ratios to the same
    server's gRPC, to PyTriton with the same body and to MLServer's JSON."""
    by_key = {(p.target, p.model, p.concurrency, p.protocol): p for p in points}
    rest = [p for p in points if p.protocol != "grpc"]
    if not rest or not kinds:
        return ""
    lines = [
        "| model | conc | target | body | req/s | p50 ms | p99 ms | vs its gRPC | vs PyTriton, same body "
        "| vs MLServer JSON | others' CPU srv/cli | notes |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model in dict.fromkeys(p.model for p in rest):
        for conc in sorted({p.concurrency for p in rest}):
            mlserver = by_key.get(("mlserver", model, conc, "json"))
            for kind in kinds:
                pytriton = by_key.get(("pytriton", model, conc, kind))
                for target in targets:
                    p = by_key.get((target, model, conc, kind))
                    if p is None:
                        continue
                    label, body = labels.get(target, target), REST_LABELS.get(kind, kind)
                    if p.status != "ok":
                        note = _cell(p.note, 200)
                        lines.append(f"| {model} | {conc} | {label} | {body} | {p.status} | | | | | | | {note} |")
                        continue
                    grpc = by_key.get((target, model, conc, "grpc"))
                    lines.append(
                        f"| {model} | {conc} | {label} | {body} | {_fmt(p.rps, 0)} | {_fmt(p.p50_ms, 3)} | "
                        f"{_fmt(p.p99_ms, 3)} | {_ratio(p.rps, grpc)} | {_ratio(p.rps, pytriton)} | "
                        f"{_ratio(p.rps, mlserver)} | {_pct(p.server_other)}/{_pct(p.client_other)} | {p.note} |"
                    )
    return "\n".join(lines)


def render_bounds(points: list[Point], targets: list[str], labels: dict[str, str]) -> str:
    """At the highest concurrency: the bound a server can reach on one core, the floor's time per
    request plus the model's time per row in full batches, and each server's share of it."""
    by_key = {(p.target, p.model, p.concurrency): p for p in points if p.status == "ok"}
    conc = max((p.concurrency for p in points), default=0)
    servers = [t for t in targets if t not in ("ort", "ort-idle", "floor", "floor-sync", "minimal")]
    rows = []
    for model in dict.fromkeys(p.model for p in points):
        floor, batched = by_key.get(("floor", model, conc)), by_key.get(("ort", model, conc))
        if floor is None or batched is None or conc < 2:
            continue
        bound = 1.0 / (1.0 / floor.rps + 1.0 / batched.rps)
        shares = []
        for target in servers:
            point = by_key.get((target, model, conc))
            shares.append("-" if point is None else f"{point.rps / bound:.0%}")
        rows.append(f"| {model} | {bound:,.0f} | " + " | ".join(shares) + " |")
    if not rows:
        return ""
    head = "| model | bound req/s | " + " | ".join(labels.get(t, t) for t in servers) + " |"
    return (f"Bound at concurrency {conc} (1 / (floor's time per request + the model's time per row in "
            f"{conc}-row batches)) and each server's share of it:\n\n{head}\n"
            f"|---|---:|{'---:|' * len(servers)}\n" + "\n".join(rows) + "\n")


def render_latency_pairs(rounds: list[Point], targets: list[str], labels: dict[str, str]) -> str:
    """At concurrency 1 over several rounds: each server's p50 minus the floor's p50 of the same
    round (the two measured minutes or seconds apart, not hours), median and range of those
    differences. Steadier than the difference of two medians when the machine drifts."""
    ok = {(p.target, p.model, p.round): p for p in rounds if p.status == "ok" and p.concurrency == 1}
    servers = [t for t in targets if t not in ("ort", "ort-idle", "floor")]
    models = list(dict.fromkeys(p.model for p in rounds))
    round_numbers = sorted({p.round for p in rounds})
    rows = []
    for model in models:
        for target in servers:
            diffs = sorted(ok[(target, model, r)].p50_ms - ok[("floor", model, r)].p50_ms for r in round_numbers
                           if (target, model, r) in ok and ("floor", model, r) in ok)
            if len(diffs) < 2:
                continue
            median = statistics.median(diffs)
            each = ", ".join(f"{d:+.3f}" for d in diffs)
            rows.append(f"| {model} | {labels.get(target, target)} | {median:+.3f} | {len(diffs)} | {each} |")
    if not rows:
        return ""
    return ("p50 at concurrency 1 minus the floor's p50 in the same round (ms), median over the rounds:\n\n"
            "| model | target | median difference | rounds | each round, sorted |\n|---|---|---:|---:|---|\n"
            + "\n".join(rows) + "\n")


def _peer_version(venv: str, package: str) -> str:
    python = VENVS / venv / "bin" / "python"
    if not python.exists():
        return "not installed"
    try:
        out = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "?"
    return out.stdout.strip() or "?"


def environment() -> dict[str, str]:
    import grpc

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    h2load = loadgen.h2load_path()
    h2_version = "missing"
    if h2load:
        out = subprocess.run([h2load, "--version"], capture_output=True, text=True, timeout=30, check=False)
        h2_version = out.stdout.strip()
    return {
        "cpu": f"{cpu} ({os.cpu_count()} cores visible)",
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "mlserver": _peer_version("mlserver", "mlserver"),
        "pytriton": _peer_version("pytriton", "nvidia-pytriton"),
        "h2load": h2_version,
    }


def command_line(args: argparse.Namespace) -> str:
    parts = [
        "python -m bench",
        f"--targets {','.join(args.targets)}",
        f"--models {','.join(args.models)}",
        f"--concurrency {','.join(map(str, args.concurrency))}",
        f"--duration {args.duration:g}",
        f"--batch {args.batch}",
    ]
    if args.repeat > 1:
        parts.append(f"--repeat {args.repeat}")
    if args.rounds > 1:
        parts.append(f"--rounds {args.rounds}")
    if args.quiet_wait:
        parts.append(f"--quiet-wait {args.quiet_wait:g}")
    if args.nice:
        parts.append(f"--nice {args.nice}")
    if args.rest:
        parts.append(f"--rest {','.join(args.rest)}")
    if args.mlserver_workers:
        parts.append(f"--mlserver-workers {args.mlserver_workers}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- main


def _csv(kind: type = str) -> object:
    def parse(text: str) -> list[object]:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--targets", type=_csv(), default=list(ALL_TARGETS), help=f"from {','.join(ALL_TARGETS)}")
    parser.add_argument("--models", type=_csv(), default=["mlp", "heavy"], help="models from examples/build_models.py")
    parser.add_argument("--concurrency", type=_csv(int), default=[1, 8, 32], help="concurrent streams (default 1,8,32)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per point (default 5)")
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--server-cpu", default="0", help="taskset core list for servers ('' = no pinning)")
    parser.add_argument("--client-cpu", default="1", help="taskset core list for h2load ('' = no pinning)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point; the fastest is kept (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole sweep (every target, servers restarted) this many times and "
                             "report each point's median round: machine noise drifts, and rounds interleave "
                             "the targets in time (default 1)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the pinned cores to be <15%% busy",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value for servers, h2load and the ort loop (negative = ahead of other work; needs root)",
    )
    parser.add_argument("--rest", type=_csv(), default=[],
                        help="also KServe v2 REST rows for the servers that have REST (sluice, mlserver, pytriton): "
                             "comma-separated bodies from json,binary (default none)")
    parser.add_argument("--mlserver-workers", type=int, default=0, help="MLServer parallel_workers (default 0)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds a server may take to start")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/.results/<time>)")
    parser.add_argument("--setup", action="store_true", help="install h2load and the peer venvs first")
    parser.add_argument("--setup-only", action="store_true",
                        help="only do --setup (and granian into bench/.venvs/granian), measure nothing")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in ALL_TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {ALL_TARGETS}")
    bad_bodies = [k for k in args.rest if k not in loadgen.REST_KINDS]
    if bad_bodies:
        parser.error(f"unknown REST bodies {bad_bodies}; choose from {','.join(loadgen.REST_KINDS)}")
    args.server_cpu = args.server_cpu or None
    args.client_cpu = args.client_cpu or None
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.setup or args.setup_only:
        peers = [t for t in args.targets if t in PEER_PACKAGES] if not args.setup_only else list(PEER_PACKAGES)
        rc = setup(peers, granian=args.setup_only)
        if rc or args.setup_only:
            return rc
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` blocks stop the servers
    # h2load and the ort loop run in this process's session: raise its autogroup too, and put it back
    # afterwards (the session may be the caller's shell).
    saved_nice = cpu.autogroup_nice("self") if args.nice else None
    if args.nice:
        cpu.set_autogroup_nice("self", args.nice)
    try:
        return _measure(args)
    finally:
        if saved_nice is not None:
            cpu.set_autogroup_nice("self", saved_nice)


def _one_round(args: argparse.Namespace, cases: dict[str, ModelCase], ctx: RunContext, workdir: Path,
               points: list[Point]) -> bool:
    """Every target once (servers started and stopped); returns True when interrupted."""
    try:
        if "ort" in args.targets:
            batched = max(args.concurrency)
            for case in cases.values():
                runs = [(0, 0), *([(batched, 0)] if batched > 1 else []),
                        *([(0, IDLE_GAP_US)] if 1 in args.concurrency else [])]
                for rows, gap_us in runs:
                    point = run_ort(case, args, workdir, rows, gap_us)
                    print(
                        f"[{point.target}] {case.name:<6} rows={rows or 1:<3} {point.status} {point.rps:9.1f} /s  "
                        f"p50 {point.p50_ms:.3f} ms p99 {point.p99_ms:.3f} ms "
                        f"{'' if point.status == 'ok' else point.note}",
                        flush=True,
                    )
                    points.append(point)
        h2load_missing = loadgen.h2load_path() is None
        for name in [t for t in args.targets if t in SERVER_TARGETS]:
            if h2load_missing:
                note = "h2load not found: `python -m bench --setup` (apt package nghttp2-client)"
                points += [Point(name, m, c, "skipped", note=note) for m in cases for c in args.concurrency]
                continue
            target = MLServerTarget(args.mlserver_workers) if name == "mlserver" else SERVER_TARGETS[name]()
            bench_target(target, cases, ctx, args, points)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, partial results below", flush=True)
        return True
    return False


def median_points(points: list[Point]) -> list[Point]:
    """One point per (target, model, concurrency): the round with the median throughput (the lower
    middle one for an even count), noting the spread when there were several rounds."""
    groups: dict[tuple[str, str, int, str], list[Point]] = {}
    for point in points:
        groups.setdefault((point.target, point.model, point.concurrency, point.protocol), []).append(point)
    chosen: list[Point] = []
    for group in groups.values():
        ok = sorted((p for p in group if p.status == "ok"), key=lambda p: p.rps)
        if not ok:
            chosen.append(group[-1])
            continue
        median = ok[(len(ok) - 1) // 2]
        if len(group) > 1:
            failed = len(group) - len(ok)
            spread = f"median of {len(ok)} rounds ({ok[0].rps:,.0f} to {ok[-1].rps:,.0f} req/s)"
            median = replace(median, note=f"{median.note}; {spread}" + (f", {failed} failed" if failed else ""))
        chosen.append(median)
    return chosen


def _measure(args: argparse.Namespace) -> int:
    """Build the models, run every target, print and save the table."""
    out = args.out or BENCH_DIR / ".results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    labels = {
        "ort": "onnxruntime in-process",
        "ort-idle": f"onnxruntime in-process, {IDLE_GAP_US} µs idle before each call",
        **{name: cls.label for name, cls in SERVER_TARGETS.items()},
    }
    env = environment()
    points: list[Point] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        workdir = Path(tmp)
        repo = workdir / "models"
        build_all(repo)
        cases = prepare_cases(repo, args.models, args.batch, workdir)
        ctx = RunContext(
            repo=repo,
            models=args.models,
            workdir=workdir,
            server_cpu=args.server_cpu,
            nice=args.nice,
            canned={m: workdir / f"{m}.response.bin" for m in args.models},
            startup_timeout=args.startup_timeout,
        )
        try:
            for round_no in range(args.rounds):
                if args.rounds > 1:
                    print(f"[round {round_no + 1}/{args.rounds}]", flush=True)
                first = len(points)
                interrupted = _one_round(args, cases, ctx, workdir, points)
                for point in points[first:]:
                    point.round = round_no
                if interrupted:
                    break
        finally:
            # Keep the server logs next to the results.
            logs = workdir / "logs"
            if logs.exists():
                for log in logs.glob("*.log"):
                    (out / log.name).write_bytes(log.read_bytes())

    rounds = points
    points = median_points(points)
    grpc_points = [p for p in points if p.protocol == "grpc"]
    table = render_table(grpc_points, _table_targets(args.targets), labels)
    bounds = render_bounds(grpc_points, _table_targets(args.targets), labels)
    if bounds:
        table += "\n\n" + bounds
    pairs = render_latency_pairs([p for p in rounds if p.protocol == "grpc"], _table_targets(args.targets), labels)
    if pairs:
        table += "\n\n" + pairs
    rest_table = render_rest_table(points, _table_targets(args.targets), labels, args.rest)
    if rest_table:
        table += ("\n\nKServe v2 REST (HTTP/1.1: h2load --h1, CONC keep-alive connections with one request each; "
                  "the gRPC rows above use 1 HTTP/2 connection with CONC streams):\n\n" + rest_table)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    pin = f"servers on core {args.server_cpu}, h2load on core {args.client_cpu}"
    if args.nice:
        pin += f", all at nice {args.nice}"
    report = (
        f"Command: `{command_line(args)}`\n\n"
        f"{header}\n- pinning: {pin}; {args.duration:g} s per point; {args.batch} row(s) per request; "
        "h2load: 1 HTTP/2 connection, CONC concurrent streams\n\n"
        f"{table}\n"
    )
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(
        json.dumps(
            {"command": command_line(args), "environment": env, "points": [asdict(p) for p in points],
             "rounds": [asdict(p) for p in rounds]},
            indent=2,
            default=str,
        )
    )
    print("\n" + report)
    print(f"(results, JSON and server logs in {out})")
    if interrupted:
        return 130
    return 0 if any(p.status == "ok" for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
