"""``sluice models | status | weights`` as an operator runs them: a subprocess against a real etcd."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from examples.build_models import build_iris
from mesh.ports import free_port
from mesh.registry.command import register, wait_outcome
from mesh.registry.records import InstanceRecord, InstanceState, RoutingDocument, StatusDocument
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services.clients import RPC_TIMEOUT_S, raw_request, stub_for

ROOT = Path(__file__).resolve().parents[3]


def sluice(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**clean, **(env or {})}, check=False)


@pytest.fixture
def flags(shared_etcd: EtcdServer, etcd_prefix: str) -> list[str]:
    record = InstanceRecord(address="127.0.0.1:8001", model="iris", version=1, instance_id="pod-a",
                            started=time.time() - 120)
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/instances/1/pod-a", record.to_json().decode())
    return ["--etcd", shared_etcd.endpoint, "--prefix", etcd_prefix]


def test_models_and_status_tables(flags: list[str]) -> None:
    models = sluice("models", *flags)
    assert models.returncode == 0, models.stderr
    assert models.stdout.split("\n")[1].split() == ["iris", "1", "1", "no"]
    status = sluice("status", *flags)
    assert status.returncode == 0, status.stderr
    header, row = status.stdout.splitlines()[:2]
    assert header.split()[:3] == ["MODEL", "VERSION", "INSTANCES"]
    assert "iris" in row and "127.0.0.1:8001 serving 2m" in row
    assert "all traffic to the newest serving version" in status.stdout


def test_weights_set_get_promote(flags: list[str], shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    changed = sluice("weights", "set", "iris", "1=90", "2=10", *flags)
    assert changed.returncode == 0, changed.stderr
    assert "iris: (no routing document) → 1=90 2=10" in changed.stdout
    assert "version 2 has weight 10 but no serving instances" in changed.stderr

    got = sluice("weights", "get", "iris", "-o", "json", *flags)
    assert got.returncode == 0, got.stderr
    data = json.loads(got.stdout)
    assert data["routing"] == {"weights": {"1": 90, "2": 10}} and data["revision"] > 0

    # What operators would see with etcdctl is the same document.
    raw = shared_etcd.etcdctl("get", "--print-value-only", f"{etcd_prefix}models/iris/routing").stdout
    assert json.loads(raw) == {"weights": {"1": 90, "2": 10}}

    promoted = sluice("weights", "promote", "iris", "1", *flags)
    assert promoted.returncode == 0, promoted.stderr
    assert "1=90 2=10 → 1=100" in promoted.stdout

    status = sluice("status", "iris", "-o", "yaml", *flags)
    report = yaml.safe_load(status.stdout)["models"][0]
    assert report["routing"] == {"weights": {"1": 100}}
    assert report["versions"][0]["weight"] == 100
    assert report["versions"][0]["instances"][0]["address"] == "127.0.0.1:8001"


def test_effective_weights_and_errors_come_from_the_status_document(flags: list[str], shared_etcd: EtcdServer,
                                                                    etcd_prefix: str) -> None:
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/status",
                        json.dumps({"effective_weights": {"1": 100}, "applied_revision": 5,
                                    "errors": ["routing: invalid routing document: weights must sum to > 0"]}))
    status = sluice("status", *flags)
    row = status.stdout.splitlines()[1]
    assert " 100 " in row and "weights must sum to > 0" in row


def test_status_shows_the_auth_mode_the_gateway_reports(flags: list[str], shared_etcd: EtcdServer,
                                                        etcd_prefix: str) -> None:
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/status",
                        json.dumps({"effective_weights": {"1": 100},
                                    "auth": {"tls": "mtls", "upstream_tls": "off", "jwt": "on"}}))
    status = sluice("status", *flags)
    assert "iris: gateway auth: tls=mtls upstream_tls=off jwt=on" in status.stdout, status.stdout
    report = json.loads(sluice("status", "-o", "json", *flags).stdout)
    assert [m["status"]["auth"] for m in report["models"] if m["model"] == "iris"] == [
        {"tls": "mtls", "upstream_tls": "off", "jwt": "on"}]


@pytest.mark.parametrize(("args", "message"), [
    (["1=90", "x=10"], "weights: version 'x' is not a positive integer"),
    (["1=0"], "weights must sum to > 0"),
    (["1=abc"], "weight of version '1' must be an integer"),
    (["90"], "expected VERSION=WEIGHT"),
])
def test_invalid_weights_exit_1_with_one_line(flags: list[str], args: list[str], message: str) -> None:
    result = sluice("weights", "set", "iris", *args, *flags)
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_compare_and_swap_conflict(flags: list[str]) -> None:
    first = sluice("weights", "set", "iris", "1=100", "--if-revision", "0", *flags)
    assert first.returncode == 0, first.stderr
    again = sluice("weights", "set", "iris", "1=50", "2=50", "--if-revision", "0", *flags)
    assert again.returncode == 1
    assert "not the expected 0" in again.stderr


def test_invalid_stored_document(flags: list[str], shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/routing", '{"weights": {"1": 10}, "wieghts": 1}')
    got = sluice("weights", "get", "iris", *flags)
    assert got.returncode == 1 and "unknown field 'wieghts'" in got.stderr
    status = sluice("status", *flags)
    assert status.returncode == 0 and "the gateway keeps the last good routing" in status.stdout


def test_unreachable_etcd_is_a_quick_clear_failure() -> None:
    start = time.monotonic()
    result = sluice("status", "--etcd", f"127.0.0.1:{free_port()}", "--connect-timeout", "2", timeout=20)
    assert result.returncode == 1
    assert result.stderr.startswith("sluice: error: etcd at 127.0.0.1:") and "unreachable" in result.stderr
    assert time.monotonic() - start < 15


def test_environment_configures_the_connection(shared_etcd: EtcdServer, etcd_prefix: str, flags: list[str]) -> None:
    env = {"SLUICE_ETCD_ENDPOINTS": shared_etcd.endpoint, "SLUICE_ETCD_PREFIX": etcd_prefix}
    result = sluice("models", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr
    assert [m["model"] for m in json.loads(result.stdout)["models"]] == ["iris"]
    bad = sluice("models", env={"SLUICE_ETCD_ENDPOINTS": "no-port"})
    assert bad.returncode == 1 and "invalid etcd settings" in bad.stderr


def put_record(etcd: EtcdServer, prefix: str, record: InstanceRecord) -> None:
    etcd.etcdctl("put", f"{prefix}models/{record.model}/instances/{record.version}/{record.instance_id}",
                 record.to_json().decode())


def test_routing_for_a_model_that_never_registered_is_refused_unless_forced(
        flags: list[str], shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    refused = sluice("weights", "set", "nosuchmodel", "1=100", *flags)
    assert refused.returncode == 1
    assert "model 'nosuchmodel' has never registered" in refused.stderr
    assert "models: iris" in refused.stderr and "--force" in refused.stderr
    assert shared_etcd.etcdctl("get", f"{etcd_prefix}models/nosuchmodel/routing").stdout == ""
    assert sluice("weights", "promote", "nosuchmodel", "1", *flags).returncode == 1
    assert "nosuchmodel" not in sluice("models", *flags).stdout

    forced = sluice("weights", "set", "nosuchmodel", "1=100", "--force", *flags)
    assert forced.returncode == 0, forced.stderr
    # A model a gateway reported on (its instances went away) is known: no --force needed.
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/gone/status", json.dumps({"effective_weights": {}}))
    assert sluice("weights", "set", "gone", "1=100", *flags).returncode == 0


def test_weights_delete_is_a_compare_and_delete(flags: list[str], shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    assert sluice("weights", "set", "iris", "1=100", *flags).returncode == 0
    revision = json.loads(sluice("weights", "get", "iris", "-o", "json", *flags).stdout)["revision"]
    stale = sluice("weights", "delete", "iris", "--if-revision", str(revision - 1), *flags)
    assert stale.returncode == 1 and f"at revision {revision}, not the expected {revision - 1}" in stale.stderr

    deleted = sluice("weights", "delete", "iris", "--if-revision", str(revision), *flags)
    assert deleted.returncode == 0, deleted.stderr
    assert "iris: 1=100 → (no routing document" in deleted.stdout
    assert shared_etcd.etcdctl("get", f"{etcd_prefix}models/iris/routing").stdout == ""
    again = sluice("weights", "delete", "iris", *flags)
    assert again.returncode == 0 and "nothing to delete" in again.stdout


def test_models_counts_processes_and_status_shows_warnings_and_failed_loads(
        flags: list[str], shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    # pod-a serves versions 1 and 2: one process, two records.
    put_record(shared_etcd, etcd_prefix, InstanceRecord(address="127.0.0.1:8001", model="iris", version=2,
                                                        instance_id="pod-a"))
    put_record(shared_etcd, etcd_prefix, InstanceRecord(
        address="127.0.0.1:8001", model="iris", version=3, instance_id="pod-a", state=InstanceState.FAILED,
        error="iris/3/model.onnx: InvalidProtobuf: the file is truncated"))
    assert sluice("models", *flags).stdout.split("\n")[1].split() == ["iris", "1,2,3", "1", "no"]

    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/status", json.dumps(
        {"effective_weights": {"2": 100}, "warnings": ["version 9 has weight 50 but no serving instances"]}))
    status = sluice("status", *flags)
    assert status.returncode == 0, status.stderr
    assert "127.0.0.1:8001 failed" in status.stdout
    assert "iris: warning: version 9 has weight 50 but no serving instances" in status.stdout
    assert ("iris: version 3 failed to load on pod-a: iris/3/model.onnx: InvalidProtobuf: the file is truncated"
            in status.stdout)
    report = json.loads(sluice("status", "-o", "json", *flags).stdout)["models"][0]
    assert report["failed_versions"] == {"3": ["pod-a: iris/3/model.onnx: InvalidProtobuf: the file is truncated"]}


def _actions(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every flag, positional and sub-command (argparse has no public walk of its actions)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield path, choice
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_registry_command_and_flag_has_help() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    found = list(_actions(parser, "sluice"))
    missing = [f"{path} {action.dest}" for path, action in found if not (action.help or "").strip()]
    assert missing == []
    assert {"sluice weights delete", "sluice weights set"} <= {path for path, _ in found}


def test_a_real_service_registers_a_version_that_failed_to_load(
        tmp_path: Path, shared_etcd: EtcdServer, etcd_prefix: str,
        start_service: Callable[..., ServiceHandle]) -> None:
    repo = tmp_path / "repo"
    build_iris(repo)
    (repo / "iris" / "3").mkdir()
    whole = (repo / "iris" / "2" / "model.onnx").read_bytes()
    (repo / "iris" / "3" / "model.onnx").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    flags = ["--etcd", shared_etcd.endpoint, "--prefix", etcd_prefix]
    # --deregister-grace: no gateway routes here, so the stop need not wait the default 2 s for one.
    service = start_service(repo, *flags, "--instance-id", "svc-a", "--deregister-grace", "0")
    failed_key = f"{etcd_prefix}models/iris/instances/3/svc-a"
    wait_for(lambda: bool(shared_etcd.etcdctl("get", failed_key).stdout), 15, "the failed version registered")
    record = InstanceRecord.from_json(shared_etcd.etcdctl("get", "--print-value-only", failed_key).stdout)
    assert record.state is InstanceState.FAILED and record.address == service.address
    assert record.error is not None and record.error.startswith("iris/3/model.onnx: ")

    status = sluice("status", "iris", *flags)
    assert status.returncode == 0, status.stderr
    assert f"{service.address} failed" in status.stdout
    assert f"iris: version 3 failed to load on svc-a: {record.error}" in status.stdout
    models = sluice("models", *flags).stdout.split("\n")[1].split()
    assert models == ["iris", "1,2,3", "1", "no"]  # one process

    # Deleted from the repository, the failed version leaves the registry too.
    shutil.rmtree(repo / "iris" / "3")
    wait_for(lambda: not shared_etcd.etcdctl("get", failed_key).stdout, 15, "the failed version deregistered")


def _status(**fields: object) -> StatusDocument:
    return StatusDocument.model_validate({"effective_weights": {1: 100}, "routing_source": "document", **fields})


@pytest.mark.parametrize(("status", "revision", "deleting", "code", "message"), [
    pytest.param(_status(routing_revision=7), 7, False, 0, "applied by the gateway", id="applied"),
    pytest.param(_status(routing_revision=5), 7, False, None, None, id="older-pending"),
    pytest.param(_status(routing_revision=5, failed_routing_revision=7, errors=["Envoy rejected it"]), 7, False, 1,
                 "failed to publish routing revision 7 of 'iris' within 0.10s: Envoy rejected it", id="failed"),
    pytest.param(_status(routing_revision=5, failed_routing_revision=6, errors=["Envoy rejected it"]), 7, False,
                 None, None, id="older-failed-keeps-waiting"),
    pytest.param(_status(routing_revision=5, failed_routing_revision=9, errors=["x"]), 7, False, 1,
                 "changed again (revision 9)", id="newer-failed"),
    pytest.param(_status(routing_revision=7, failed_routing_revision=7, errors=["a later snapshot failed"]), 7,
                 False, 3, "applied with differences", id="in-force-then-failed"),
    pytest.param(_status(routing_revision=5, failed_routing_revision=0, errors=["Envoy rejected it"]), 8, True, 1,
                 "failed to publish the deletion", id="deletion-failed"),
    pytest.param(_status(routing_revision=5, failed_routing_revision=5, errors=["x"]), 8, True, None, None,
                 id="deletion-pending-older-failed"),
])
def test_wait_outcome_ends_only_on_the_failure_of_the_written_revision(
        status: StatusDocument, revision: int, deleting: bool, code: int | None, message: str | None) -> None:
    written = None if deleting else RoutingDocument(weights={1: 100})
    outcome = wait_outcome(status, "iris", revision, written, "0.10s")
    if code is None:
        assert outcome is None
    else:
        assert outcome is not None and outcome[0] == code and message is not None and message in outcome[1], outcome


def test_a_reload_that_fails_while_the_older_copy_serves_is_shown_and_still_routed(
        tmp_path: Path, shared_etcd: EtcdServer, etcd_prefix: str,
        start_service: Callable[..., ServiceHandle]) -> None:
    repo = tmp_path / "repo"
    build_iris(repo)
    model_file = repo / "iris" / "2" / "model.onnx"
    whole = model_file.read_bytes()
    flags = ["--etcd", shared_etcd.endpoint, "--prefix", etcd_prefix]
    service = start_service(repo, *flags, "--instance-id", "svc-a", "--reload-quiet-ms", "100",
                            "--deregister-grace", "0")
    key = f"{etcd_prefix}models/iris/instances/2/svc-a"

    def stored() -> InstanceRecord | None:
        value = shared_etcd.etcdctl("get", "--print-value-only", key).stdout.strip()
        return InstanceRecord.from_json(value) if value else None

    wait_for(lambda: stored() is not None, 15, "version 2 registered")
    serving = stored()
    assert serving is not None and serving.error is None

    model_file.write_bytes(whole[: len(whole) // 2])  # the new copy of version 2 is cut short
    wait_for(lambda: (r := stored()) is not None and r.error is not None, 20, "the reload failure in etcd")
    failed = stored()
    assert failed is not None and failed.error is not None
    # Still the older copy, still routed to: state, address and digest unchanged.
    assert failed.state is InstanceState.SERVING and failed.sha256 == serving.sha256
    assert failed.address == serving.address == service.address
    assert failed.error.startswith("reload failed, the previous copy serves on: iris/2/model.onnx: ")
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    with stub_for(service) as stub:
        answer = stub.ModelInfer(raw_request("iris", {"input": ("FP32", x)}, version="2"), timeout=RPC_TIMEOUT_S)
    assert answer.model_version == "2"

    status = sluice("status", "iris", *flags)
    assert status.returncode == 0, status.stderr
    assert f"{service.address} serving" in status.stdout
    assert f"iris: warning: version 2 on svc-a: {failed.error}" in status.stdout
    report = json.loads(sluice("status", "iris", "-o", "json", *flags).stdout)["models"][0]
    assert report["reload_errors"] == {"2": [f"svc-a: {failed.error}"]} and report["failed_versions"] == {}

    model_file.write_bytes(whole)  # the files are back to the copy serving: the warning goes
    wait_for(lambda: (r := stored()) is not None and r.error is None, 20, "the reload failure cleared")
    assert "warning: version 2" not in sluice("status", "iris", *flags).stdout
