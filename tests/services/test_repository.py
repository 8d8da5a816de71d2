"""The model repository against the real ``sluice serve``: folder names, paths that lead outside
it, what clients are shown, and the explicit load/unload surface."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from mesh.protocol import MODEL_NAME_RULE
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.conftest import start_handle
from tests.services.test_config import alias_bomb

RPC_TIMEOUT_S = 30.0
SECRET = "hunter2_secret_key"
MEBIBYTE = 1 << 20


def build_repo(root: Path) -> tuple[Path, Path]:
    """A repository with good models, a broken one, a badly named folder and symbolic links that
    lead out of it (and one that stays inside); and the folder outside it they point to."""
    repo, outside = root / "repo", root / "outside"
    model = models.identity("FP32")
    models.write_model(repo, "good", model)
    models.write_model(repo, "broken", b"this is not an ONNX model")
    models.write_model(repo, "iris-", model)  # valid files, invalid name (ends with '-')
    models.write_model(repo, "bomb", model)
    (repo / "bomb" / "config.yaml").write_text(alias_bomb())
    # What a client must never see: a config.yaml with a secret top-level key and an unparsable one.
    models.write_model(outside, "secretdir", model, config={SECRET: 1})
    (outside / "unparsable").mkdir()
    (outside / "unparsable" / "config.yaml").write_text(f"password: [{SECRET}\n")
    models.write_model(repo, "linked_config", model)
    (repo / "linked_config" / "config.yaml").symlink_to(outside / "secretdir" / "config.yaml")
    (repo / "linked_model_dir").symlink_to(outside / "secretdir", target_is_directory=True)
    (repo / "linked_version").mkdir()
    (repo / "linked_version" / "1").symlink_to(outside / "secretdir" / "1", target_is_directory=True)
    models.write_model(repo, "linked_file", model)
    (repo / "linked_file" / "1" / "model.onnx").unlink()
    (repo / "linked_file" / "1" / "model.onnx").symlink_to(outside / "secretdir" / "1" / "model.onnx")
    # Inside the repository a link is fine (shared files kept in a hidden folder).
    models.write_model(repo / ".shared", "v", model)
    (repo / "inside_link").mkdir()
    (repo / "inside_link" / "1").symlink_to(repo / ".shared" / "v" / "1", target_is_directory=True)
    return repo, outside


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_repo(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def service(layout: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    # Explicit control switched on the way a deployment would: the flag is used in test_hot_reload.
    with start_handle(layout[0], tmp_path_factory.mktemp("hostile-logs"), "--reload-quiet-ms", "50",
                      env={"SLUICE_REPOSITORY_CONTROL": "true"}) as handle:
        yield handle


@pytest.fixture
def stub(service: ServiceHandle) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    assert service.process.alive(), service.process.log_text()[-4000:]


def index(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[tuple[str, str], tuple[str, str]]:
    rows = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S).models
    return {(r.name, r.version): (r.state, r.reason) for r in rows}


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def load(stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> grpc.RpcError:
    return rpc_error(lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name),
                                                      timeout=RPC_TIMEOUT_S))


def unload(stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> grpc.RpcError:
    return rpc_error(lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name),
                                                        timeout=RPC_TIMEOUT_S))


def test_names_that_lead_outside_are_refused_unread(layout: tuple[Path, Path],
                                                    stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    outside = layout[1]
    for name in ["../outside/secretdir", "../outside/unparsable", str(outside / "secretdir"),
                 str(outside / "unparsable"), "good/../../outside/secretdir", "", "iris-", "a" * 300,
                 "x" * MEBIBYTE]:
        for error in (load(stub, name), unload(stub, name)):
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name[:80], error)
            details = error.details() or ""
            assert MODEL_NAME_RULE in details and SECRET not in details
            assert len(details) < 600, len(details)
    rows = index(stub)
    assert not [key for key in rows if "/" in key[0] or "secret" in key[0]], rows
    assert not [reason for _state, reason in rows.values() if SECRET in reason], rows


def test_unknown_models_leave_no_trace(service: ServiceHandle, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    before = index(stub)
    log_path = service.process.log_path
    log_before = log_path.stat().st_size
    for i in range(100):
        name = f"nope-{i}-{'n' * 50}"
        error = load(stub, name)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        assert error.details() == f"model '{name}' is not in the model repository"
    for _ in range(20):  # and a name far over every limit is not logged whole
        assert load(stub, "y" * MEBIBYTE).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert index(stub) == before
    grown = log_path.stat().st_size - log_before
    assert grown < MEBIBYTE, f"the service log grew by {grown} bytes"


def test_links_out_of_the_repository_are_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rows = index(stub)
    assert rows[("inside_link", "1")][0] == "READY"
    refused = {key: value for key, value in rows.items() if key[0].startswith("linked_")}
    assert set(refused) == {("linked_config", ""), ("linked_model_dir", ""), ("linked_version", "1"),
                            ("linked_file", "1")}, rows
    for (name, _version), (state, reason) in refused.items():
        assert state == "UNAVAILABLE" and "resolves outside the model repository" in reason, (name, reason)
        assert SECRET not in reason
    # Loading one explicitly says the same, and shows nothing of the file it points to.
    error = load(stub, "linked_config")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "linked_config/config.yaml: resolves outside" in (error.details() or "")
    assert SECRET not in (error.details() or "")


def test_yaml_alias_bomb_is_refused_for_its_model_only(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rows = index(stub)
    state, reason = rows[("bomb", "")]
    assert state == "UNAVAILABLE" and reason.startswith("bomb/config.yaml: cannot read: anchors and aliases")
    assert ("bomb", "1") not in rows and rows[("good", "1")][0] == "READY"


def test_reasons_shown_to_clients_carry_no_server_paths(layout: tuple[Path, Path],
                                                        stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    root = str(layout[0].parent.resolve())
    rows = index(stub)
    state, reason = rows[("broken", "1")]
    assert state == "UNAVAILABLE" and reason.startswith("broken/1/model.onnx: ONNX Runtime cannot load it")
    assert not [r for _state, r in rows.values() if root in r or str(layout[0]) in r], rows
    errors = [rpc_error(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="broken"), timeout=RPC_TIMEOUT_S)),
              rpc_error(lambda: stub.ModelConfig(pb.ModelConfigRequest(name="broken"), timeout=RPC_TIMEOUT_S)),
              load(stub, "broken")]
    for error in errors:
        details = error.details() or ""
        assert "broken/1/model.onnx" in details and root not in details, details


def test_badly_named_folder_is_refused_for_itself_only(layout: tuple[Path, Path], service: ServiceHandle,
                                                       stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rows = index(stub)
    assert rows[("good", "1")][0] == "READY"
    state, reason = rows[("iris-", "")]
    assert state == "UNAVAILABLE" and reason == f"folder 'iris-' is not a valid model name: use {MODEL_NAME_RULE}"
    assert ("iris-", "1") not in rows
    # Found by the watcher while serving: the same, and it goes away with the folder.
    shutil.copytree(layout[0] / "good", layout[0] / "_late")
    wait_for(lambda: ("_late", "") in index(stub), 15, "refused folder in RepositoryIndex")
    shutil.rmtree(layout[0] / "_late")
    wait_for(lambda: ("_late", "") not in index(stub), 15, "refused folder gone from RepositoryIndex")
    assert ("good", "1") in index(stub) and service.process.alive()


def test_load_and_unload_are_refused_unless_enabled(layout: tuple[Path, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models.write_model(repo, "good", models.identity("FP32"))
    handle = start_handle(repo, tmp_path)
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for error in (unload(stub, "good"), load(stub, "good"), load(stub, "../outside/secretdir")):
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
                assert "--repository-control" in (error.details() or "")
            assert stub.ModelReady(pb.ModelReadyRequest(name="good"), timeout=RPC_TIMEOUT_S).ready
    finally:
        handle.process.stop()
