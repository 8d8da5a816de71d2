"""Envoy's bootstrap: the runtime values it sets, in both bootstraps, live in the real Envoy."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.bootstrap import TRACE_FLUSH_SPANS, bootstrap, validation_config
from gateway.envoy import find_envoy
from gateway.render import default_render_options, render_snapshot
from gateway.snapshot import dump_yaml
from mesh.ports import free_port
from mesh.registry.keys import KeySchema
from mesh.registry.state import build_state
from tests.fixtures.processes import ManagedProcess, wait_for

FLUSH_KEY = "tracing.opentelemetry.min_flush_spans"


def _runtime(admin_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/runtime", timeout=2) as response:
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def test_the_served_and_the_validated_bootstrap_carry_the_same_runtime() -> None:
    snapshot = render_snapshot(build_state(KeySchema(), 1, []), {}, default_render_options(xds_dir="/tmp/x"))
    served = bootstrap("/tmp/x", 9901)["layered_runtime"]
    assert served == validation_config(snapshot)["layered_runtime"]
    assert served["layers"][0]["static_layer"] == {FLUSH_KEY: TRACE_FLUSH_SPANS}
    assert "admin_layer" in served["layers"][-1]  # /runtime_modify keeps working


@pytest.mark.timeout(60)
def test_envoy_batches_span_exports_by_the_runtime_value(
        tmp_path: Path, process_factory: Callable[..., ManagedProcess]) -> None:
    options = default_render_options(xds_dir=str(tmp_path), listen_host="127.0.0.1", listen_port=free_port(),
                                     otlp_endpoint="127.0.0.1:4317")
    admin_port = free_port()
    path = tmp_path / "envoy.yaml"
    path.write_bytes(dump_yaml(validation_config(render_snapshot(build_state(KeySchema(), 1, []), {}, options),
                                                 admin_port)))
    process_factory("envoy", [find_envoy(), "-c", str(path), "-l", "warning", "--disable-hot-restart",
                              "--concurrency", "1"])

    def answers() -> bool:
        try:
            _runtime(admin_port)
        except OSError:
            return False
        return True

    wait_for(answers, 30, "Envoy's admin API")
    runtime = _runtime(admin_port)
    assert runtime["entries"][FLUSH_KEY]["final_value"] == str(TRACE_FLUSH_SPANS), runtime
    assert runtime["layers"] == ["sluice", "admin"], runtime
