"""The gateway's own gRPC answers: the RPCs of the KServe v2 protocol that name no model.

ServerLive, ServerReady, ServerMetadata and RepositoryIndex sent to the gateway without a model
header are about the gateway, not about one model service, so the controller answers them itself
from the snapshot Envoy confirmed last: live while the controller runs, ready while at least one
model has a route with weight, and the index of every model and version the gateway routes. A
``direct_response`` cannot carry a gRPC body with trailers, so this is a small gRPC server on
loopback that Envoy reaches through one cluster (:data:`ANSWERS_CLUSTER`). The REST versions of the
same answers are rendered as direct responses (gateway/rest_routes.py) from the same view.

Every other method is UNIMPLEMENTED here; routes send only these four paths to this server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.snapshot import Snapshot, cluster_name
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

ANSWERS_CLUSTER = "gateway-answers"
"""The cluster of this server (model clusters are ``<model>.v<N>``: no clash)."""
ANSWERED_PATHS = tuple(f"/inference.GRPCInferenceService/{method}"
                       for method in ("ServerLive", "ServerReady", "ServerMetadata", "RepositoryIndex"))
SERVER_NAME = "sluice-gateway"
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class GatewayView:
    """What the gateway routes: every (model, version) with serving endpoints, and readiness."""

    index: tuple[tuple[str, int], ...]
    routable: bool


def view_of(snapshot: Snapshot | None) -> GatewayView:
    """The view of ``snapshot`` (None: nothing confirmed yet, nothing routed)."""
    if snapshot is None:
        return GatewayView((), False)
    index: list[tuple[str, int]] = []
    routable = False
    for model, plan in sorted(snapshot.plans.items()):
        for version in sorted({int(v) for v in plan.weights} | _versions_with_endpoints(snapshot, model)):
            if _has_endpoints(snapshot, cluster_name(model, version)):
                index.append((model, version))
                routable = routable or int(plan.weights.get(version, 0)) > 0
    return GatewayView(tuple(index), routable)


def _versions_with_endpoints(snapshot: Snapshot, model: str) -> set[int]:
    prefix = f"{model}.v"
    return {int(name[len(prefix):]) for name in snapshot.endpoints
            if name.startswith(prefix) and name[len(prefix):].isdigit()}


def _has_endpoints(snapshot: Snapshot, cluster: str) -> bool:
    assignment = snapshot.endpoints.get(cluster)
    return assignment is not None and any(group.get("lb_endpoints") for group in assignment.get("endpoints", []))


class _Answers(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, view: Callable[[], GatewayView], version: str) -> None:
        self._view = view
        self._version = version

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._view().routable)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Context) -> pb.RepositoryIndexResponse:
        models = [pb.RepositoryIndexResponse.ModelIndex(name=name, version=str(version), state="READY")
                  for name, version in self._view().index]
        return pb.RepositoryIndexResponse(models=models)


class AnswersServer:
    """The gRPC server of :mod:`gateway.answers` on ``host`` (loopback), a free port."""

    def __init__(self, view: Callable[[], GatewayView], version: str, host: str = "127.0.0.1") -> None:
        # Requests here are tiny and name no model: a small message cap and few streams.
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024),
                                                ("grpc.max_concurrent_streams", 256)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Answers(view, version), self._server)
        self.host = host
        self.port = 0

    async def start(self) -> str:
        """Listen and return ``host:port``."""
        self.port = self._server.add_insecure_port(f"{self.host}:0")
        await self._server.start()
        return f"{self.host}:{self.port}"

    async def stop(self) -> None:
        await self._server.stop(grace=1.0)
