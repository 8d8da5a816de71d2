"""The aetcd client extended with TLS, and translation of aetcd/gRPC errors into :mod:`mesh.errors`.

Only this package imports aetcd (etcd3 and aetcd cannot share a process: duplicate descriptors).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher

from mesh.errors import (
    EtcdAuthError,
    EtcdError,
    EtcdRefusedError,
    EtcdUnavailableError,
    LeaseLostError,
    MeshError,
    RevisionCompactedError,
)

_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.CANCELLED)
# Refusals of one request for what it carries ("etcdserver: request is too large", gRPC's "received
# message larger than max", a key the user may not write): sending it again fails again.
_REFUSED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.PERMISSION_DENIED)
# RESOURCE_EXHAUSTED that is about the cluster, not the request: every write fails until it clears.
_CLUSTER_EXHAUSTED = ("too many requests", "database space exceeded")


class TlsClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type information
    """``aetcd.Client`` whose channel can be a TLS channel (aetcd itself only opens insecure ones)."""

    def __init__(self, *, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials
        self._is_connecting: bool = False

    async def connect(self) -> None:
        # Same steps as aetcd.Client.connect, except for the channel construction.
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            if self._credentials is None:
                self.channel = grpc.aio.insecure_channel(target, options=options)
            else:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", response.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


async def member_status(client: TlsClient) -> Any:
    """The raw Status reply of the member ``client`` talks to, response header included (aetcd's
    ``status()`` drops the header and lists the members on top)."""
    return await client.maintenancestub.Status(rpc.StatusRequest(), timeout=client._timeout,
                                               metadata=client.metadata)


def translate_error(exc: BaseException, endpoint: str) -> MeshError | None:
    """The :mod:`mesh.errors` equivalent of an aetcd/gRPC error, or None if it is not one."""
    if isinstance(exc, MeshError):
        return exc
    if isinstance(exc, aetcd.RevisionCompactedError):
        return RevisionCompactedError(int(exc.compacted_revision))
    if isinstance(exc, (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, aetcd.WatchTimeoutError,
                        asyncio.TimeoutError)):
        return EtcdUnavailableError(f"etcd at {endpoint} is unreachable: {_detail(exc)}")
    if isinstance(exc, aetcd.exceptions.UnauthenticatedError):
        return EtcdAuthError(f"etcd at {endpoint} refused the credentials: {_detail(exc)}")
    if isinstance(exc, (aetcd.ClientError, grpc.aio.AioRpcError)) and "authentication failed" not in str(exc):
        text, code = str(exc), _grpc_code(exc)
        if "lease not found" in text:
            return LeaseLostError(f"etcd at {endpoint}: {_detail(exc)}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(part in text for part in _CLUSTER_EXHAUSTED):
            return EtcdUnavailableError(f"etcd at {endpoint} cannot take writes now: {_detail(exc)}")
        if code in _REFUSED_CODES:
            return EtcdRefusedError(f"etcd at {endpoint} refused the request: {_detail(exc)}")
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in _UNAVAILABLE_CODES:
            return EtcdUnavailableError(f"etcd at {endpoint} is unreachable: {exc.details()}")
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED or "authentication failed" in (exc.details() or ""):
            return EtcdAuthError(f"etcd at {endpoint} refused the credentials: {exc.details()}")
        return EtcdError(f"etcd at {endpoint}: {exc.details()}")
    if isinstance(exc, aetcd.InvalidArgumentError) and "authentication failed" in str(exc):
        return EtcdAuthError(f"etcd at {endpoint} refused the credentials: {exc}")
    if isinstance(exc, aetcd.ClientError):
        return EtcdError(f"etcd at {endpoint}: {_detail(exc)}")
    return None


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status code behind ``exc`` (aetcd wraps the gRPC error it got into its own)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, grpc.aio.AioRpcError):
            return seen.code()
        seen = seen.__cause__ or seen.__context__
    return None


def _detail(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
