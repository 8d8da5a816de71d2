"""What shadow comparison costs the callers: one real service, shadow off, at 10 % and at 100 %,
with the worker in a thread of the service and in a process of its own (``--shadow-isolation``),
under SCHED_IDLE (``--shadow-policy idle``, the default; ``nice`` on request); callers' p50
latency and throughput at 1 and 32 concurrent gRPC clients, rounds interleaved (the order of the
configurations rotates from round to round).

    python -m bench.shadow [--seconds 3] [--rounds 3] [--isolations thread,process] [--policies idle]
                           [--shares 0.05,0.25] [--pin]
                           [--clients 1,32] [--fractions 0.1,1] [--serve-args "..."] [--offers 3000]

The model is a stack of 256x256 MatMuls (about 0.3 ms per call on one core), baseline and
candidate the same graph, so every comparison agrees and costs one full candidate run. Ratios to
"off" are medians of same-round ratios; "off (control)" is a second service without shadow,
measured like the others, so its ratios show how far this run's noise alone moves a row.
``worker CPU``: the shadow worker thread's own CPU time
(/proc/<pid>/task/<tid>/schedstat) over the measurement, in % of one core: what
``--shadow-cpu-share`` bounds; in the process isolation, all the child's threads
(/proc/<child>/task/*/schedstat). ``child RSS``: the shadow process's resident memory at the end
of the measurement (its own interpreter, ONNX Runtime and copy of the candidate). A second table
gives what :meth:`Shadow.offer` costs the request thread, in µs per call, measured in this process
with the real classes and a real child (:mod:`bench.shadow_offer`). The load average before and
after is printed with the tables: the callers, the service and its worker share the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from bench.shadow_offer import TABLE_HEAD, offer_cost, row
from mesh.ports import free_port

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CLIENTS = (1, 32)


@dataclass(frozen=True)
class Config:
    fraction: float
    policy: str = "idle"
    isolation: str = "process"
    share: float | None = None
    """``--shadow-cpu-share``; None: the service's default."""
    control: bool = False
    """A second "off", measured like the others: its ratio to "off" is the noise of this run."""

    @property
    def label(self) -> str:
        if not self.fraction:
            return "off (control)" if self.control else "off"
        return (f"{100 * self.fraction:.0f} % {self.isolation}" + ("" if self.policy == "idle" else f" {self.policy}")
                + ("" if self.share is None else f", share {100 * self.share:g} %"))


@dataclass(frozen=True)
class Sample:
    p50_ms: float
    rate: float
    compared_per_s: float
    worker_cpu: float
    """Share of one core the worker thread used over the measurement (0 without shadow)."""
    failed: int = 0
    """Calls that failed (counted, not timed; the caller goes on)."""
    child_rss_mb: float = 0.0
    """Resident memory of the shadow process (0 without one)."""


@dataclass
class Results:
    samples: dict[tuple[Config, int], list[Sample]] = field(default_factory=dict)

    def add(self, config: Config, clients: int, sample: Sample) -> None:
        self.samples.setdefault((config, clients), []).append(sample)

    def median(self, config: Config, clients: int, attribute: str) -> float:
        return statistics.median(float(getattr(s, attribute)) for s in self.samples[(config, clients)])

    def ratio(self, config: Config, base: Config, clients: int, attribute: str) -> float:
        """Median over the rounds of this configuration's value over ``base``'s in the same round."""
        return statistics.median(
            float(getattr(mine, attribute)) / float(getattr(theirs, attribute))
            for mine, theirs in zip(self.samples[(config, clients)], self.samples[(base, clients)], strict=True))


def render(results: Results, configs: list[Config], clients_list: tuple[int, ...] = CLIENTS) -> str:
    """The docs table: one row per configuration and client count, ratios to "off"."""
    off = configs[0]
    lines = ["| shadow | clients | p50 ms | req/s | p50 / off | req/s / off | compared/s | worker CPU | child RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for clients in clients_list:
        for config in configs:
            lines.append(
                f"| {config.label} | {clients} | {results.median(config, clients, 'p50_ms'):.3f} "
                f"| {results.median(config, clients, 'rate'):,.0f} "
                f"| {results.ratio(config, off, clients, 'p50_ms'):.2f} "
                f"| {results.ratio(config, off, clients, 'rate'):.2f} "
                f"| {results.median(config, clients, 'compared_per_s'):,.0f} "
                f"| {100 * results.median(config, clients, 'worker_cpu'):.1f} % "
                f"| {_mb(results.median(config, clients, 'child_rss_mb'))} |")
    return "\n".join(lines)


def _mb(value: float) -> str:
    return f"{value:.0f} MB" if value else "-"


def _model(layers: int = 6, size: int = 256) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, last = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]))
        last = f"h{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "shadow_bench",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _request(size: int = 256) -> bytes:
    from protos.inference import grpc_service_pb2 as pb

    x = np.ones((1, size), dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="m", model_version="2",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, size])],
        raw_input_contents=[x.tobytes()]).SerializeToString()


def pin_callers() -> set[int]:
    """``--pin``: this process (the callers) on the first core; returns the others, the service's.
    Call before any thread starts: the callers' threads inherit the mask."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two cores")
    os.sched_setaffinity(0, {cpus[0]})
    return set(cpus[1:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s: a service (its shadow process follows it) or a helper."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def write_repo(tmp: Path) -> Path:
    """A model repository under ``tmp`` with model ``m`` versions 2 and 3, both :func:`_model`."""
    repo = tmp / "repo"
    for version in (2, 3):
        (repo / "m" / str(version)).mkdir(parents=True)
        (repo / "m" / str(version) / "model.onnx").write_bytes(_model().SerializeToString())
    return repo


def _start(repo: Path, config: Config, log: Path, extra: list[str], cpus: set[int] | None = None
           ) -> tuple[subprocess.Popen[bytes], int, int]:
    shadow = ({"shadow": {"candidate": 3, "baseline": 2, "fraction": config.fraction}} if config.fraction else {})
    (repo / "m" / "config.yaml").write_text(yaml.safe_dump({"max_batch_size": 0, **shadow}))
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "serve", "--repo", str(repo), "--port", str(port),
                             "--metrics-port", str(metrics), "--log-level", "warning",
                             "--shadow-policy", config.policy, "--shadow-isolation", config.isolation,
                             *([] if config.share is None else ["--shadow-cpu-share", str(config.share)]), *extra],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    if cpus is not None:  # before it starts threads or its shadow process (both inherit the mask)
        os.sched_setaffinity(proc.pid, cpus)
    body = _request()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                probe: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
                probe(body, timeout=1)
            if config.fraction:
                _until_compared(port, metrics, deadline)
            return proc, port, metrics
        except grpc.RpcError:
            time.sleep(0.2)
    proc.kill()
    proc.wait(10)
    raise SystemExit(f"the service did not serve within 60 s: {log.read_text()[-2000:]}")


def _until_compared(port: int, metrics: int, deadline: float) -> None:
    """Requests until a first comparison: measurements start once the worker (the shadow
    process: its interpreter, ONNX Runtime and candidate copy) is ready."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
        while not _compared(metrics) and time.monotonic() < deadline:
            call(_request(), timeout=5)
            time.sleep(0.05)


def _load(port: int, clients: int, seconds: float) -> tuple[float, float, int]:
    """(p50 ms, answered requests per second, failed calls) over ``seconds`` of ``clients``
    closed-loop callers."""
    body = _request()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    until = time.monotonic() + seconds

    def caller(mine: list[float]) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
            while time.monotonic() < until:
                started = time.perf_counter()
                try:
                    call(body, timeout=10)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                mine.append(time.perf_counter() - started)

    threads = [threading.Thread(target=caller, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        print(f"{len(failures)} of {len(failures) + sum(map(len, latencies))} calls failed at {clients} clients, "
              f"first: {failures[0]}", file=sys.stderr)
    flat = [v for mine in latencies for v in mine]
    return 1000 * statistics.median(flat), len(flat) / seconds, len(failures)


def _compared(metrics: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sluice_shadow_compared_total"))


def worker_tids(pid: int) -> list[int]:
    """The service's threads at nice 19: the shadow worker (under either policy)."""
    tids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[16]) == 19:  # field 19: nice
            tids.append(int(task.name))
    return tids


def shadow_child(pid: int) -> int | None:
    """The service's shadow process, None where it has none (thread isolation, shadow off)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        if children:
            return int(children[0])
    return None


def child_rss_mb(child: int | None) -> float:
    if child is None:
        return 0.0
    try:
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def thread_cpu_seconds(pid: int, tids: list[int]) -> float:
    """CPU seconds the threads ran (schedstat: nanoseconds on a CPU), 0 for threads that are gone."""
    total = 0.0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return total


def measure(port: int, metrics: int, pid: int, clients: int, seconds: float) -> Sample:
    _load(port, clients, 0.5)  # warm-up (and the worker has started)
    child = shadow_child(pid)
    owner = pid if child is None else child
    tids = worker_tids(pid) if child is None else [int(t.name) for t in Path(f"/proc/{child}/task").iterdir()]
    compared, cpu, started = _compared(metrics), thread_cpu_seconds(owner, tids), time.monotonic()
    p50, rate, failed = _load(port, clients, seconds)
    elapsed = time.monotonic() - started
    return Sample(p50, rate, (_compared(metrics) - compared) / seconds,
                  (thread_cpu_seconds(owner, tids) - cpu) / elapsed, failed, child_rss_mb(child))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default="idle", help="comma-separated --shadow-policy values")
    parser.add_argument("--isolations", default="thread,process", help="comma-separated --shadow-isolation values")
    parser.add_argument("--clients", default="1,32", help="comma-separated numbers of concurrent callers")
    parser.add_argument("--fractions", default="0.1,1", help="comma-separated shadow fractions (besides off)")
    parser.add_argument("--shares", default="", help="comma-separated --shadow-cpu-share values, each a "
                        "configuration of its own (default: the service's default only)")
    parser.add_argument("--offers", type=int, default=3000, help="offers timed per isolation (0: none)")
    parser.add_argument("--pin", action="store_true",
                        help="the callers on the first core, the service (and its shadow process) on the others: "
                        "the service's cores are its own, as with callers on other machines")
    parser.add_argument("--serve-args", default="", help="more sluice serve flags, for every configuration "
                        "(e.g. \"--handler-policy normal\")")
    args = parser.parse_args()
    service_cpus = pin_callers() if args.pin else None
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    isolations = [i.strip() for i in args.isolations.split(",") if i.strip()]
    shares = [float(v) for v in args.shares.split(",") if v.strip()] or [None]
    configs = [Config(0.0), Config(0.0, control=True)]
    fractions = [float(v) for v in args.fractions.split(",") if v.strip()]
    clients_list = tuple(int(v) for v in args.clients.split(",") if v.strip())
    configs += [Config(f, p, i, share) for i in isolations for p in policies for share in shares for f in fractions]
    results = Results()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repo(Path(tmp))
        for round_ in range(args.rounds):
            shift = round_ % len(configs)
            for config in configs[shift:] + configs[:shift]:
                proc, port, metrics = _start(repo, config, Path(tmp) / "service.log", shlex.split(args.serve_args),
                                             service_cpus)
                try:
                    for clients in clients_list:
                        results.add(config, clients, measure(port, metrics, proc.pid, clients, args.seconds))
                finally:
                    stop(proc)
        offers = {(i, interval): offer_cost(repo / "m" / "2" / "model.onnx", i, args.offers, interval)
                  for i in isolations for interval in (0.002, 0.0)} if args.offers else {}
    load_after = os.getloadavg()
    print(render(results, configs, clients_list))
    if offers:
        print("\n" + TABLE_HEAD)
        for (isolation, interval), cost in offers.items():
            print(row(isolation, interval, cost, args.offers))
    failed = sum(s.failed for samples in results.samples.values() for s in samples)
    if failed:
        print(f"\n{failed} calls failed (not in the figures)")
    print(f"\n{os.cpu_count()} cores; load average (1, 5, 15 min) before: "
          f"{', '.join(f'{v:.2f}' for v in load_before)}; after: {', '.join(f'{v:.2f}' for v in load_after)}")


if __name__ == "__main__":
    main()
