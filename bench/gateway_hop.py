"""Envoy hop overhead: one ``sluice serve`` instance called directly and through the gateway, in one run.

Starts a throwaway etcd, one ``sluice serve`` (iris version 1) and ``sluice gateway`` (which runs
Envoy 1.40), registers the instance, checks both paths answer exactly what onnxruntime computes,
then measures with the same load generator (h2load, one HTTP/2 connection, a pre-encoded
ModelInfer body, header ``x-model-name: iris``; and through the gateway once more without the
header, routed on the body's ``model_name``) p50/p99 at concurrency 1 and
throughput at concurrency 32. Rounds alternate direct / gateway so that drift in the machine's
load hits both alike; each number is the median over the rounds. Prints a Markdown table with
gateway / direct ratios and the machine's load during the runs.

With ``--steps`` it also runs one static Envoy per step of ``bench/envoy_steps.py`` (a bare Envoy,
then one feature of the rendered gateway config added at a time, up to the whole config with
tracing) in the same rounds, and prints what each step adds: the median over the rounds of the
step's p50 minus the previous step's p50 in the same round. The variants of bench/envoy_steps.py
(the whole config with one earlier default put back, or 1 % sampling) run in the same rounds too,
each paired with the whole config: what each change to the default is worth, in one run.

    python -m bench.gateway_hop [--duration 10] [--rounds 3] [--envoy-concurrency 1] [--steps]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gateway_hop.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnxruntime as ort

from bench import loadgen
from bench.cpu import core_ticks
from bench.envoy_steps import STEPS, VARIANTS, full_config, step_config, variant_config, with_ports
from bench.propagation import Admin, etcd_binary, start, tear_down, wait
from examples.build_models import build_iris
from gateway.envoy import find_envoy
from gateway.snapshot import dump_yaml
from mesh.devstack.stack import etcd_argv
from mesh.observability.traces import TraceReceiver
from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord
from mesh.registry.settings import EtcdSettings

PREFIX = "/sluice-bench-hop/"
HEADERS = ("x-model-name: iris",)
SIZE_TOLERANCE = 0.02


@dataclass
class Sample:
    """One h2load run and how busy the whole machine was meanwhile."""

    rps: float
    p50_ms: float
    p99_ms: float
    machine_busy: float
    cpu_us: float
    """CPU time of the whole machine per request (µs): every process on the path, and the noise."""
    envoy_us: float = 0.0
    """CPU time of the target's Envoy per request (µs), all its threads: what its config costs,
    barely touched by the rest of the machine's load (0 for the direct path)."""
    receiver_us: float = 0.0
    """CPU time of this process per request (µs): the OTLP receiver the tracing targets export to."""


@dataclass
class Target:
    name: str
    port: int
    headers: tuple[str, ...] = HEADERS
    """``x-model-name`` for header routing; () makes the gateway route on the body's model_name."""
    response_bytes: int = 0
    samples: dict[int, list[Sample]] = field(default_factory=dict)
    scheme: str = "http"
    """``https``: h2load speaks TLS to this target."""
    envoy_pid: int | None = None
    """The Envoy process that serves this target (None: no Envoy on the path)."""

    def median(self, concurrency: int, attribute: str) -> float:
        return statistics.median(float(getattr(s, attribute)) for s in self.samples[concurrency])

    def paired(self, other: Target, concurrency: int, attribute: str) -> float:
        """Median over the rounds of this target's value minus ``other``'s in the same round."""
        return statistics.median(float(getattr(mine, attribute)) - float(getattr(theirs, attribute))
                                 for mine, theirs in zip(self.samples[concurrency], other.samples[concurrency],
                                                         strict=True))


def machine_busy_since(before: list[tuple[int, int]]) -> float:
    """Busy share of all cores since ``before`` (``core_ticks`` per core)."""
    after = [core_ticks(core) for core in range(len(before))]
    busy = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    total = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return busy / max(total, 1)


def process_cpu_ns(pid: int | None) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (the scheduler's own count, not ticks)."""
    if pid is None:
        return 0
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


def child_pid(parent: int, name: str, timeout: float = 30.0) -> int | None:
    """The pid of ``parent``'s child process called ``name`` (the Envoy a ``sluice gateway`` runs),
    None if there is none within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text()
            except OSError:
                continue
            comm, _, rest = fields.rpartition(")")
            if comm.partition("(")[2] == name and int(rest.split()[1]) == parent:
                return int(stat.parent.name)
        time.sleep(0.1)
    return None


def measure(target: Target, body_path: Path, concurrency: int, *, duration: float, log_dir: Path,
            index: int) -> Sample:
    cores = os.cpu_count() or 1
    envoy_before, receiver_before = process_cpu_ns(target.envoy_pid), process_cpu_ns(os.getpid())
    before = [core_ticks(core) for core in range(cores)]
    result = loadgen.run_h2load(target.port, body_path, concurrency, duration, cpu=None, headers=target.headers,
                                scheme=target.scheme,
                                log_path=log_dir / f"h2load-{target.name}-c{concurrency}-{index}.tsv")
    busy = machine_busy_since(before)
    envoy_ns = process_cpu_ns(target.envoy_pid) - envoy_before
    receiver_ns = process_cpu_ns(os.getpid()) - receiver_before
    if not result.ok or result.failed:
        raise SystemExit(f"{target.name} c={concurrency}: {result.message}, {result.failed} failed")
    if abs(result.avg_response_bytes - target.response_bytes) > SIZE_TOLERANCE * target.response_bytes:
        raise SystemExit(f"{target.name} c={concurrency}: average response {result.avg_response_bytes:.0f} B, "
                         f"a correct one is {target.response_bytes} B: errors counted as successes?")
    requests = max(result.succeeded, 1)
    return Sample(result.rps, result.p50_ms, result.p99_ms, busy, busy * cores / max(result.rps, 1e-9) * 1e6,
                  envoy_ns / requests / 1e3, receiver_ns / requests / 1e3)


async def register(settings: EtcdSettings, address: str) -> None:
    schema = KeySchema(settings.prefix)
    async with EtcdClient(settings) as client:
        record = InstanceRecord(address=address, model="iris", version=1, instance_id="bench-hop")
        await client.put(schema.instance("iris", 1, record.instance_id), record.to_json())


def render(direct: Target, gateway: Target, body: Target, args: argparse.Namespace, load: tuple[float, ...]) -> str:
    def row(target: Target) -> str:
        return (f"| {target.name} | {target.median(1, 'p50_ms'):.3f} | {target.median(1, 'p99_ms'):.3f} "
                f"| {target.median(1, 'rps'):,.0f} | {target.median(32, 'rps'):,.0f} "
                f"| {target.median(32, 'p50_ms'):.2f} "
                f"| {100 * target.median(1, 'machine_busy'):.0f} / {100 * target.median(32, 'machine_busy'):.0f} "
                f"| {target.median(1, 'cpu_us'):.0f} / {target.median(32, 'cpu_us'):.0f} "
                f"| {target.median(1, 'envoy_us'):.0f} / {target.median(32, 'envoy_us'):.0f} |")

    p50_ratio = gateway.median(1, "p50_ms") / direct.median(1, "p50_ms")
    p50_added = gateway.median(1, "p50_ms") - direct.median(1, "p50_ms")
    rps_ratio = gateway.median(32, "rps") / direct.median(32, "rps")
    lines = [
        f"iris v1, batch 1, {args.rounds} rounds x {args.duration:g} s per point (median), "
        f"Envoy --concurrency {args.envoy_concurrency}, {os.cpu_count()} cores, "
        f"load average before {load[0]:.2f}, after {load[1]:.2f}",
        "",
        "| path | c=1 p50 ms | c=1 p99 ms | c=1 req/s | c=32 req/s | c=32 p50 ms | machine busy % (c=1 / c=32) "
        "| CPU µs/req (c=1 / c=32) | Envoy CPU µs/req (c=1 / c=32) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row(direct),
        row(gateway),
        row(body),
        f"| gateway / direct | {p50_ratio:.2f}x (+{p50_added:.3f} ms) | "
        f"{gateway.median(1, 'p99_ms') / direct.median(1, 'p99_ms'):.2f}x "
        f"| {gateway.median(1, 'rps') / direct.median(1, 'rps'):.2f}x | {rps_ratio:.2f}x "
        f"| {gateway.median(32, 'p50_ms') / direct.median(32, 'p50_ms'):.2f}x | | | |",
        f"| body / header routing (paired) | {body.paired(gateway, 1, 'p50_ms'):+.3f} ms "
        f"| | | {body.median(32, 'rps') / gateway.median(32, 'rps'):.2f}x | | "
        f"| {body.paired(gateway, 1, 'cpu_us'):+.0f} / {body.paired(gateway, 32, 'cpu_us'):+.0f} "
        f"| {body.paired(gateway, 1, 'envoy_us'):+.0f} / {body.paired(gateway, 32, 'envoy_us'):+.0f} |",
    ]
    return "\n".join(lines)


def render_steps(direct: Target, steps: list[Target]) -> str:
    """What each step adds to the one before (paired by round), and the whole hop over direct."""
    lines = [
        "| step | c=1 p50 ms | added to the step before, c=1 p50 ms | over direct, c=1 p50 ms "
        "| c=32 req/s | c=32 / step before | CPU µs/req (c=1 / c=32) | CPU added (c=1 / c=32) "
        "| Envoy CPU µs/req (c=1 / c=32) | Envoy CPU added (c=1 / c=32) | receiver CPU µs/req (c=1) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous = direct
    for target in steps:
        lines.append(
            f"| {target.name} | {target.median(1, 'p50_ms'):.3f} "
            f"| {target.paired(previous, 1, 'p50_ms'):+.3f} | {target.paired(direct, 1, 'p50_ms'):+.3f} "
            f"| {target.median(32, 'rps'):,.0f} | {target.median(32, 'rps') / previous.median(32, 'rps'):.2f}x "
            f"| {target.median(1, 'cpu_us'):.0f} / {target.median(32, 'cpu_us'):.0f} "
            f"| {target.paired(previous, 1, 'cpu_us'):+.0f} / {target.paired(previous, 32, 'cpu_us'):+.0f} "
            f"| {target.median(1, 'envoy_us'):.0f} / {target.median(32, 'envoy_us'):.0f} "
            f"| {target.paired(previous, 1, 'envoy_us'):+.0f} / {target.paired(previous, 32, 'envoy_us'):+.0f} "
            f"| {target.median(1, 'receiver_us'):.0f} |")
        previous = target
    return "\n".join(lines)


def render_variants(whole: Target, variants: list[Target]) -> str:
    """Each variant against the whole config, paired by round (positive: the variant is slower)."""
    lines = [
        f"Against the last step ({whole.name}), same rounds:",
        "",
        "| variant | c=1 p50 ms | vs the whole config, c=1 p50 ms | c=32 req/s | c=32 vs the whole config "
        "| CPU µs/req (c=1 / c=32) | CPU vs the whole config (c=1 / c=32) | Envoy CPU µs/req (c=1 / c=32) "
        "| Envoy CPU vs the whole config (c=1 / c=32) | receiver CPU µs/req (c=1) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in variants:
        lines.append(
            f"| {target.name} | {target.median(1, 'p50_ms'):.3f} | {target.paired(whole, 1, 'p50_ms'):+.3f} "
            f"| {target.median(32, 'rps'):,.0f} | {target.median(32, 'rps') / whole.median(32, 'rps'):.2f}x "
            f"| {target.median(1, 'cpu_us'):.0f} / {target.median(32, 'cpu_us'):.0f} "
            f"| {target.paired(whole, 1, 'cpu_us'):+.0f} / {target.paired(whole, 32, 'cpu_us'):+.0f} "
            f"| {target.median(1, 'envoy_us'):.0f} / {target.median(32, 'envoy_us'):.0f} "
            f"| {target.paired(whole, 1, 'envoy_us'):+.0f} / {target.paired(whole, 32, 'envoy_us'):+.0f} "
            f"| {target.median(1, 'receiver_us'):.0f} |")
    return "\n".join(lines)


def start_steps(service_address: str, workdir: Path, concurrency: int, receiver: TraceReceiver,
                procs: list[subprocess.Popen[bytes]]) -> tuple[list[tuple[Target, Admin]], list[tuple[Target, Admin]]]:
    """One static Envoy per step and per variant of bench/envoy_steps.py, each on its own ports."""
    full = full_config(service_address, listen_port=0, admin_port=0, access_log=str(workdir / "steps-access.log"),
                       otlp_endpoint=receiver.endpoint)

    def run(name: str, label: str, config: dict[str, object]) -> tuple[Target, Admin]:
        listen_port, admin_port = free_port(), free_port()
        path = workdir / f"envoy-{name}.yaml"
        path.write_bytes(dump_yaml(with_ports(config, listen_port=listen_port, admin_port=admin_port)))
        procs.append(start([find_envoy(), "-c", str(path), "-l", "warning", "--disable-hot-restart",
                            "--concurrency", str(concurrency)], workdir / f"envoy-{name}.log"))
        return Target(label, listen_port, envoy_pid=procs[-1].pid), Admin(admin_port)

    steps = [run(step.name, step.label, step_config(full, step.name)) for step in STEPS]
    variants = [run(variant.name, variant.label, variant_config(full, variant.name)) for variant in VARIANTS]
    return steps, variants


def iris_repo(workdir: Path) -> Path:
    """A model repository under ``workdir`` holding iris v1 only; the path of its ``iris`` folder."""
    build_iris(workdir / "built")
    repo = workdir / "repo" / "iris"
    repo.mkdir(parents=True)
    shutil.copy(workdir / "built" / "iris" / "config.yaml", repo / "config.yaml")
    shutil.copytree(workdir / "built" / "iris" / "1", repo / "1")
    return repo


def gateway_argv(etcd_port: int, listen_port: int, admin_port: int, xds_dir: Path, envoy_concurrency: int,
                 *flags: str) -> list[str]:
    """``sluice gateway`` on loopback for a benchmark: no metrics port, access log to /dev/null."""
    return [sys.executable, "-m", "mesh.cli", "gateway", "--etcd", f"127.0.0.1:{etcd_port}", "--prefix", PREFIX,
            "--listen-host", "127.0.0.1", "--listen-port", str(listen_port), "--admin-port", str(admin_port),
            "--metrics-port", "-1", "--envoy-concurrency", str(envoy_concurrency), "--xds-dir", str(xds_dir),
            "--access-log", "/dev/null", "--log-format", "json", *flags]


def serve_argv(repo: Path, port: int, *flags: str) -> list[str]:
    """``sluice serve`` over ``repo`` on loopback for a benchmark: no metrics port, warnings only."""
    return [sys.executable, "-m", "mesh.cli", "serve", "--repo", str(repo), "--port", str(port),
            "--metrics-port", "-1", "--log-format", "json", "--log-level", "warning", *flags]


def bench_parser(description: str | None, duration: float) -> argparse.ArgumentParser:
    """The flags of every gateway benchmark: --duration (default ``duration``), --rounds,
    --envoy-concurrency, --keep."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=duration,
                        help=f"seconds per h2load run (default {duration:g})")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, h2load logs)")
    return parser


def require_h2load() -> None:
    if loadgen.h2load_path() is None:
        raise SystemExit("h2load not found (apt-get install nghttp2-client)")


def measure_rounds(targets: Sequence[Target], body_path: Path, args: argparse.Namespace, log_dir: Path) -> None:
    """Every target at c=1 and c=32 in ``args.rounds`` rounds, every other round in reverse order
    (drift in the machine's load hits every target alike); the samples go to each target, a line
    per run to stdout (with the Envoy's CPU where the target has one)."""
    log_dir.mkdir()
    for index in range(args.rounds):
        for concurrency in (1, 32):
            for target in targets if index % 2 == 0 else targets[::-1]:
                sample = measure(target, body_path, concurrency, duration=args.duration, log_dir=log_dir,
                                 index=index)
                target.samples.setdefault(concurrency, []).append(sample)
                envoy = "" if target.envoy_pid is None else f", Envoy {sample.envoy_us:.0f} µs/req"
                print(f"round {index + 1} {target.name} c={concurrency}: {sample.rps:,.0f} req/s "
                      f"p50 {sample.p50_ms:.3f} ms{envoy}, machine {100 * sample.machine_busy:.0f} % busy",
                      flush=True)


def main() -> None:
    parser = bench_parser(__doc__, duration=10.0)
    parser.add_argument("--steps", action="store_true",
                        help="also time the gateway config built up one feature at a time (bench/envoy_steps.py)")
    args = parser.parse_args()
    require_h2load()

    workdir = Path(tempfile.mkdtemp(prefix="sluice-gateway-hop-"))
    procs: list[subprocess.Popen[bytes]] = []
    receiver = TraceReceiver(workdir / "traces.jsonl")
    receiver.start()
    try:
        etcd_port, peer_port = free_port(), free_port()
        procs.append(start(etcd_argv(etcd_binary(), workdir / "etcd", etcd_port, peer_port, durable=False),
                           workdir / "etcd.log"))
        repo = iris_repo(workdir)
        service_port, listen_port, admin_port = free_port(), free_port(), free_port()
        procs.append(start(serve_argv(repo.parent, service_port), workdir / "serve.log"))
        procs.append(start(gateway_argv(etcd_port, listen_port, admin_port, workdir / "xds", args.envoy_concurrency),
                           workdir / "gateway.log"))
        gateway_pid = procs[-1].pid
        admin = Admin(admin_port)
        wait(lambda: admin.get("/ready").strip() == b"LIVE", 60, "Envoy ready")
        settings = EtcdSettings(endpoints=[f"127.0.0.1:{etcd_port}"], prefix=PREFIX)
        asyncio.run(register(settings, f"127.0.0.1:{service_port}"))

        session = ort.InferenceSession(str(repo / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        inputs = {"input": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)}
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, inputs), strict=True))
        body = loadgen.encode_request("iris", inputs)
        body_path = workdir / "iris.body.bin"
        body_path.write_bytes(loadgen.grpc_frame(body))

        envoy_pid = child_pid(gateway_pid, "envoy")
        if envoy_pid is None:
            raise SystemExit(f"no envoy process under the gateway (pid {gateway_pid})")
        direct = Target("direct", service_port)
        gateway = Target("gateway, header routing", listen_port, envoy_pid=envoy_pid)
        body_routed = Target("gateway, body routing (no header)", listen_port, headers=(), envoy_pid=envoy_pid)
        steps, variants = start_steps(f"127.0.0.1:{service_port}", workdir, args.envoy_concurrency, receiver,
                                      procs) if args.steps else ([], [])
        for _, step_admin in steps + variants:
            wait(lambda a=step_admin: a.get("/ready").strip() == b"LIVE", 60, "a step's Envoy ready")
        targets = (direct, gateway, body_routed, *(target for target, _ in steps + variants))
        for target in targets:
            error = loadgen.wait_until_serving(target.port, body, 60.0)
            if error:
                raise SystemExit(f"{target.name}: {error}")
            check = loadgen.check_target(target.port, "iris", inputs, expected, body)
            if not check.ok:
                raise SystemExit(f"{target.name}: {check.message}")
            target.response_bytes = check.response_bytes

        load_before = os.getloadavg()[0]
        measure_rounds(targets, body_path, args, workdir / "h2load")
        load_after = os.getloadavg()[0]
        print("\n" + render(direct, gateway, body_routed, args, (load_before, load_after)))
        if steps:
            print("\n" + render_steps(direct, [target for target, _ in steps]))
            print("\n" + render_variants(steps[-1][0], [target for target, _ in variants]))
    finally:
        tear_down(procs, workdir, keep=args.keep)
        receiver.stop()


if __name__ == "__main__":
    main()
