"""The servers under test and how to start, check and stop them.

Every server runs in its own process group (``start_new_session=True``), pinned with ``taskset`` to the
server core, with stdout/stderr in a log file. ``ServerProcess.stop`` sends SIGTERM to the whole group,
waits, then SIGKILLs it, so helper processes (Triton's Python stubs, MLServer workers) go too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from bench.cpu import launch_prefix, set_autogroup_nice
from mesh.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
VENVS = BENCH_DIR / ".venvs"
SLUICE_BIN = REPO_ROOT / ".venv" / "bin" / "sluice"

ORT_TO_TRITON = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64"}


class TargetError(RuntimeError):
    """A target could not be started; the message goes into the results table."""



def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    text = [line for line in text if not line.startswith("$ ")]  # skip the command line we wrote
    return " | ".join(line.strip()[:200] for line in text[-lines:])


@dataclass
class ServerProcess:
    """A started server: its process group, the gRPC port, the REST port (if any) and the log file."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log_file: object = field(default=None, repr=False)
    http_port: int | None = None
    """The KServe v2 REST (HTTP/1.1) port; None when the target serves gRPC only."""

    def died(self) -> str | None:
        """None while running; otherwise why it stopped (exit code + log tail)."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"{self.name} exited with code {code}: {log_tail(self.log_path)}"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL what is left."""
        pgid = self.proc.pid  # start_new_session=True: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if not _group_members(pgid):
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader so it does not linger as a zombie
                if not _group_members(pgid):
                    break
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        close = getattr(self._log_file, "close", None)
        if callable(close):
            close()


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # Format: pid (comm) state ppid pgrp ...; comm may hold spaces, so split after the last ')'.
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def spawn(
    name: str,
    cmd: list[str],
    log_path: Path,
    port: int,
    *,
    cpu: str | None,
    nice: int = 0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    http_port: int | None = None,
) -> ServerProcess:
    cmd = [*launch_prefix(cpu, nice), *cmd]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("wb")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_file.write(("$ " + " ".join(cmd) + "\n").encode())
    log_file.flush()
    proc = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=str(cwd or REPO_ROOT),
        start_new_session=True,
    )
    if nice:
        set_autogroup_nice(proc.pid, nice)  # the server leads its own session, hence its own autogroup
    return ServerProcess(name=name, proc=proc, port=port, log_path=log_path, _log_file=log_file, http_port=http_port)


@dataclass
class RunContext:
    """What every target needs to start: the model repository and where to put its files."""

    repo: Path  # DIR/<model>/<version>/model.onnx (+ config.yaml), from examples/build_models.py
    models: list[str]
    workdir: Path  # scratch space for this run (canned responses, configs, logs)
    server_cpu: str | None  # taskset core list for servers, None = no pinning
    nice: int = 0  # nice value for servers (and the load generator); negative = higher priority
    canned: dict[str, Path] = field(default_factory=dict)  # model -> serialized ModelInferResponse
    startup_timeout: float = 180.0


class Target(ABC):
    """A server to benchmark. ``unavailable()`` says why it can't run here (None = it can)."""

    name: str = ""
    label: str = ""
    rest = False
    """Whether the server also answers KServe v2 REST (``ServerProcess.http_port``)."""

    def unavailable(self) -> str | None:
        return None

    @abstractmethod
    def start(self, ctx: RunContext) -> ServerProcess: ...


class FloorTarget(Target):
    """``bench/floor_server.py`` in one of its modes; the subclasses say which."""

    name = "floor"
    label = "floor (bare grpc.aio, canned)"
    flags: tuple[str, ...] = ()
    runs_models = False
    """Serve the models (``--model``) instead of canned responses (``--canned``)."""

    def start(self, ctx: RunContext) -> ServerProcess:
        port = free_port()
        cmd = [sys.executable, "-m", "bench.floor_server", *self.flags, "--port", str(port)]
        for model in ctx.models:
            if self.runs_models:
                cmd += ["--model", f"{model}={ctx.repo / model / '1' / 'model.onnx'}"]
            else:
                cmd += ["--canned", f"{model}={ctx.canned[model]}"]
        return spawn(self.name, cmd, ctx.workdir / "logs" / f"{self.name}.log", port, cpu=ctx.server_cpu,
                     nice=ctx.nice)


class SyncFloorTarget(FloorTarget):
    name = "floor-sync"
    label = "floor (bare sync grpc, canned)"
    flags = ("--sync",)


class MinimalOrtTarget(FloorTarget):
    name = "minimal"
    label = "minimal sync grpc + onnxruntime"
    flags = ("--sync",)
    runs_models = True


class SluiceTarget(Target):
    name = "sluice"
    label = "sluice"
    rest = True

    def unavailable(self) -> str | None:
        if not SLUICE_BIN.exists():
            return f"{SLUICE_BIN} not found (the sluice entry point: pip install -e .)"
        try:
            probe = subprocess.run(
                [str(SLUICE_BIN), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
            )
        except subprocess.TimeoutExpired:
            return "`sluice serve --help` did not answer within 60s"
        if probe.returncode != 0:
            last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["?"]
            return f"`sluice serve --help` failed (rc={probe.returncode}): {last[0][:160]}"
        return None

    def start(self, ctx: RunContext) -> ServerProcess:
        port, http_port = free_port(), free_port()
        cmd = [str(SLUICE_BIN), "serve", "--repo", str(ctx.repo), "--port", str(port), "--metrics-port", "0",
               "--rest-port", str(http_port)]
        return spawn(self.name, cmd, ctx.workdir / "logs" / "sluice.log", port, cpu=ctx.server_cpu, nice=ctx.nice,
                     http_port=http_port)


def _tensor_meta(values: list[ort.NodeArg]) -> list[dict[str, object]]:
    return [
        {"name": v.name, "datatype": ORT_TO_TRITON[v.type], "shape": [d if isinstance(d, int) else -1 for d in v.shape]}
        for v in values
    ]


class MLServerTarget(Target):
    """Seldon MLServer 1.7 + bench/peers/mlserver_runtime.py (onnxruntime, 1 intra-op thread)."""

    name = "mlserver"
    label = "MLServer 1.7"
    venv = VENVS / "mlserver"
    rest = True

    def __init__(self, parallel_workers: int = 0) -> None:
        self.parallel_workers = parallel_workers

    def unavailable(self) -> str | None:
        if not (self.venv / "bin" / "mlserver").exists():
            return f"{self.venv} missing: run `python -m bench --setup`"
        return None

    def write_workspace(self, ctx: RunContext, grpc_port: int, http_port: int = 0) -> Path:
        ws = ctx.workdir / "mlserver"
        ws.mkdir(parents=True, exist_ok=True)
        settings = {
            "http_port": http_port or free_port(),
            "grpc_port": grpc_port,
            "metrics_port": free_port(),
            # 0 = inference in the server process. With workers (the default, 1) every request also
            # crosses a multiprocessing queue, which only costs on a single pinned core.
            "parallel_workers": self.parallel_workers,
            "debug": False,
            "load_models_at_startup": True,
        }
        (ws / "settings.json").write_text(json.dumps(settings, indent=2))
        for model in ctx.models:
            path = ctx.repo / model / "1" / "model.onnx"
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            model_dir = ws / model
            model_dir.mkdir(exist_ok=True)
            model_settings = {
                "name": model,
                "implementation": "mlserver_runtime.OnnxRuntime",
                "inputs": _tensor_meta(session.get_inputs()),
                "outputs": _tensor_meta(session.get_outputs()),
                "parameters": {"uri": str(path), "version": "1"},
            }
            (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
        return ws

    def start(self, ctx: RunContext) -> ServerProcess:
        port, http_port = free_port(), free_port()
        ws = self.write_workspace(ctx, port, http_port)
        env = {"PYTHONPATH": str(BENCH_DIR / "peers"), "BENCH_ORT_THREADS": "1"}
        cmd = [str(self.venv / "bin" / "mlserver"), "start", str(ws)]
        return spawn(
            self.name, cmd, ctx.workdir / "logs" / "mlserver.log", port, cpu=ctx.server_cpu, nice=ctx.nice, env=env,
            http_port=http_port,
        )


class PyTritonTarget(Target):
    """NVIDIA PyTriton 0.7 + bench/peers/pytriton_server.py (dynamic batching, onnxruntime 1 thread)."""

    name = "pytriton"
    label = "PyTriton 0.7"
    venv = VENVS / "pytriton"
    rest = True

    def unavailable(self) -> str | None:
        if not (self.venv / "bin" / "python").exists():
            return f"{self.venv} missing: run `python -m bench --setup`"
        return None

    def libpython_dir(self) -> str:
        """The venv interpreter's LIBDIR: Triton's Python stub must find libpython3.X.so there."""
        out = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def start(self, ctx: RunContext) -> ServerProcess:
        port, http_port = free_port(), free_port()
        workspace = ctx.workdir / "pytriton-ws"
        if workspace.exists():
            shutil.rmtree(workspace)
        try:
            libdir = self.libpython_dir()
        except (subprocess.SubprocessError, OSError) as exc:
            raise TargetError(f"cannot query the pytriton venv's interpreter: {exc}") from exc
        env = {
            "LD_LIBRARY_PATH": ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p),
            # PyTriton copies Triton into the workspace and makes temp model folders; keep both here.
            "TMPDIR": str(ctx.workdir),
        }
        cmd = [
            str(self.venv / "bin" / "python"),
            str(BENCH_DIR / "peers" / "pytriton_server.py"),
            "--repo",
            str(ctx.repo),
            "--models",
            ",".join(ctx.models),
            "--grpc-port",
            str(port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(free_port()),
            "--workspace",
            str(workspace),
            "--threads",
            "1",
        ]
        return spawn(
            self.name, cmd, ctx.workdir / "logs" / "pytriton.log", port, cpu=ctx.server_cpu, nice=ctx.nice, env=env,
            http_port=http_port,
        )


SERVER_TARGETS: dict[str, type[Target]] = {
    "floor": FloorTarget,
    "floor-sync": SyncFloorTarget,
    "minimal": MinimalOrtTarget,
    "sluice": SluiceTarget,
    "mlserver": MLServerTarget,
    "pytriton": PyTritonTarget,
}
ALL_TARGETS = ["ort", *SERVER_TARGETS]
