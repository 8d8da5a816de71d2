"""Metric values through the Prometheus endpoint and log fields through structlog, per outcome."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import structlog
import tritonclient.grpc as triton_grpc
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from mesh.observability.logging import merge_request_fields
from services.catalog import ModelCatalog
from services.dataplane import DataPlane
from services.errors import InvalidRequestError
from services.manager import ModelManager
from services.metrics import ServiceMetrics
from services.types import InferInput, InferRequest
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.clients import infer_input


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_request_counters_by_code(zoo: ServiceHandle, client: triton_grpc.InferenceServerClient) -> None:
    """Success and each client-caused error class show up under their gRPC code."""
    model = "arithmetic"
    before = zoo.metrics_text()
    metadata = client.get_model_metadata(model)
    good = [infer_input(i.name, np.ones([2, *[max(1, int(d)) for d in i.shape[1:]]], dtype=np.float32), "FP32")
            for i in metadata.inputs]
    client.infer(model, good)
    client.infer(model, good)
    bad_dtype = [infer_input(i.name, np.ones([1, *[max(1, int(d)) for d in i.shape[1:]]], dtype=np.float64),
                 "FP64") for i in metadata.inputs]
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        client.infer(model, bad_dtype)
    with pytest.raises(Exception, match="NOT_FOUND"):
        client.infer(model, good, model_version="9")
    after = zoo.metrics_text()

    def delta(code: str) -> float:
        return (sample(after, "sluice_requests_total", model=model, code=code)
                - sample(before, "sluice_requests_total", model=model, code=code))

    assert delta("OK") == 2
    assert delta("INVALID_ARGUMENT") == 1
    # An unknown version never reached a version's counters: the error is the client's alone.
    assert delta("NOT_FOUND") == 0
    total_count = (sample(after, "sluice_request_duration_seconds_count", model=model, phase="total")
                   - sample(before, "sluice_request_duration_seconds_count", model=model, phase="total"))
    assert total_count == 2
    assert sample(after, "sluice_loaded_versions", model=model) == 1
    assert sample(after, "sluice_model_loads_total", model="broken", outcome="failed") >= 1


def test_queue_full_and_deadline_are_counted(tmp_path: Path, start_service: object) -> None:
    repo = tmp_path / "repo"
    models.write_model(repo, "slow", models.slow(), config={"max_batch_size": 0,
                                                            "dynamic_batching": {"max_queue_size": 1}})
    service = start_service(repo)  # type: ignore[operator]
    x = np.ones((1, 1), dtype=np.float32)

    async def flood() -> list[BaseException | object]:
        import tritonclient.grpc.aio as aio_client

        async with aio_client.InferenceServerClient(service.address) as client:
            async def one(timeout: float | None) -> object:
                tensor = aio_client.InferInput("x", [1, 1], "FP32")
                tensor.set_data_from_numpy(x)
                return await client.infer("slow", [tensor], client_timeout=timeout)
            return await asyncio.gather(*(one(None) for _ in range(6)), return_exceptions=True)

    results = asyncio.run(flood())
    assert any("RESOURCE_EXHAUSTED" in str(r) for r in results), results
    text = service.metrics_text()
    assert sample(text, "sluice_requests_total", model="slow", code="RESOURCE_EXHAUSTED") >= 1
    assert sample(text, "sluice_requests_total", model="slow", code="OK") >= 1


async def test_log_lines_carry_the_request_context(tmp_path: Path) -> None:
    """The data plane binds model, version and request id; log lines of the request carry them."""
    repo = tmp_path / "repo"
    models.write_model(repo, "m", models.identity("FP32"))
    catalog = ModelCatalog()
    metrics = ServiceMetrics()
    manager = ModelManager(repo, catalog, metrics)
    await manager.load_all()
    plane = DataPlane(catalog, manager)
    structlog.contextvars.clear_contextvars()
    with capture_logs(processors=[merge_contextvars, merge_request_fields]) as logs:
        bad = InferRequest("m", None, [InferInput("x", "FP64", (1, 1), np.ones((1, 1)))], id="req-7")
        with pytest.raises(InvalidRequestError):
            plane.infer(bad)
        structlog.get_logger("test").warning("something about this request")
    await manager.close()
    line = next(entry for entry in logs if entry["event"] == "something about this request")
    assert line["model"] == "m" and line["version"] == 1 and line["request_id"] == "req-7"
    assert line["log_level"] == "warning"
