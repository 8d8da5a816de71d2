"""Model repositories and long-lived service processes shared by the tests in this folder.

One ``sluice serve`` process over the "zoo" repository serves every test that does not change
server state (statistics tests use models of their own); tests that need a special repository or
kill the process start their own with the ``start_service`` fixture.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc

from examples.build_models import build_iris, build_mlp
from mesh.ports import free_port
from tests.fixtures.processes import ManagedProcess
from tests.fixtures.service import ServiceHandle, rest_port_of, sluice_argv
from tests.services import models

START_TIMEOUT_S = 60.0
_counter = itertools.count()

# Holds requests open long enough that concurrent ones reliably land in one batch.
BATCH_WINDOW_US = 1_000_000
MLP_WINDOW_US = 100_000


def build_zoo(repo: Path) -> Path:
    """Every model the shared service serves."""
    build_iris(repo)
    build_mlp(repo)
    for datatype in models.NUMPY_DATATYPES:
        models.write_model(repo, f"identity_{datatype.lower()}", models.identity(datatype))
    for source, target in CASTS:
        models.write_model(repo, f"cast_{source.lower()}_{target.lower()}", models.cast(source, target))
    models.write_model(repo, "fixed", models.fixed_first_dim())
    models.write_model(repo, "column_sum", models.column_sum())
    models.write_model(repo, "arithmetic", models.arithmetic(), config={"labels": {"team": "tests"}})
    # Statistics tests count requests: each has a model nobody else sends to.
    models.write_model(repo, "counted", models.identity("FP32"))
    models.write_model(repo, "windowed", models.identity("FP32"), config={
        "max_batch_size": 8,
        "dynamic_batching": {"max_queue_delay_us": BATCH_WINDOW_US},
    })
    models.write_model(repo, "windowed_rows", models.identity("FP32"), config={
        "max_batch_size": 8,
        "dynamic_batching": {"max_queue_delay_us": BATCH_WINDOW_US},
    })
    models.write_model(repo, "mlp_batched", (repo / "mlp" / "1" / "model.onnx").read_bytes(), config={
        "dynamic_batching": {"max_queue_delay_us": MLP_WINDOW_US},
    })
    models.write_model(repo, "broken", b"this is not an ONNX model")
    return repo


CASTS = [("INT32", "FP64"), ("FP32", "INT64"), ("UINT8", "FP16"), ("FP64", "FP32"), ("BOOL", "INT32"),
         ("INT64", "BOOL")]


def start_handle(repo: Path, log_dir: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> ServiceHandle:
    """Start ``sluice serve`` outside the function-scoped fixtures; the caller must stop it (``with
    start_handle(...) as handle:`` does)."""
    port, metrics_port = free_port(), free_port()
    rest_port = rest_port_of(extra)
    if rest_port is None:  # the default (--port + 2) would be a port nobody reserved
        rest_port = free_port()
        extra = ("--rest-port", str(rest_port), *extra)
    argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--metrics-port",
                       str(metrics_port), "--log-format", "json", *extra)
    process = ManagedProcess("sluice-serve", argv, log_dir / f"sluice-{next(_counter)}.log", env=env)
    handle = ServiceHandle(process, port, metrics_port, repo, rest_port)
    process.wait_until_or_stop(handle.ready, START_TIMEOUT_S, "ServerReady")
    return handle


@pytest.fixture(scope="session")
def zoo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("zoo") / "repo")


@pytest.fixture(scope="session")
def zoo(zoo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    """The shared service over :func:`build_zoo`'s repository."""
    with start_handle(zoo_repo, tmp_path_factory.mktemp("zoo-logs")) as handle:
        yield handle


@pytest.fixture
def client(zoo: ServiceHandle) -> Iterator[triton_grpc.InferenceServerClient]:
    """An unchanged Triton client on the shared service; checks the server is still up after."""
    with triton_grpc.InferenceServerClient(zoo.address) as triton:
        yield triton
    assert zoo.process.alive(), zoo.process.log_text()[-4000:]

