"""The gateway config built up one feature at a time (bench/envoy_steps.py): each step is valid to
the real Envoy, adds something to the step before, and the last is what sluice renders."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.envoy_steps import (
    STEP_NAMES,
    VARIANT_NAMES,
    full_config,
    step_config,
    step_configs,
    variant_config,
    with_ports,
)
from gateway.envoy import find_envoy
from gateway.snapshot import dump_yaml

FULL = full_config("127.0.0.1:7001", listen_port=18080, admin_port=18081, access_log="/dev/null",
                   otlp_endpoint="127.0.0.1:4317")


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _filters(config: dict[str, Any]) -> list[str]:
    return [f["name"] for f in _hcm(config)["http_filters"]]


def test_the_last_step_is_the_rendered_gateway_config_and_the_first_a_bare_router() -> None:
    configs = step_configs(FULL)
    assert list(configs) == list(STEP_NAMES)
    assert configs[STEP_NAMES[-1]] == FULL
    bare = configs["bare"]
    assert _filters(bare) == ["envoy.filters.http.router"]
    assert _hcm(bare)["generate_request_id"] is False
    assert "access_log" not in _hcm(bare) and "tracing" not in _hcm(bare)
    assert len(bare["static_resources"]["clusters"]) == 1
    assert "health_checks" not in bare["static_resources"]["clusters"][0]


def test_every_step_adds_to_the_one_before() -> None:
    configs = list(step_configs(FULL).values())
    for before, after in itertools.pairwise(configs):
        assert before != after
    assert _filters(step_config(FULL, "buffer"))[0] == "sluice.max_request_bytes"
    assert "sluice.body_model.extract" not in _filters(step_config(FULL, "buffer"))
    assert "tracing" in _hcm(FULL) and "tracing" not in _hcm(step_config(FULL, "body-filters"))


def test_an_unknown_step_is_named() -> None:
    with pytest.raises(ValueError, match="unknown step 'lua'"):
        step_config(FULL, "lua")


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def test_each_variant_puts_back_one_earlier_default() -> None:
    rest_first = variant_config(FULL, "rest-first")
    names = [r["name"] for r in _routes(rest_first)]
    assert sorted(names) == sorted(r["name"] for r in _routes(FULL))
    first_grpc = names.index("repository-control/RepositoryModelLoad")
    assert all(name.startswith("rest/") for name in names[:first_grpc])
    assert not any(name.startswith("rest/") for name in names[first_grpc:])
    assert not any("grpc" in r["match"] for r in _routes(rest_first))
    assert {"prefix": "/v2/"} in [r["match"] for r in _routes(rest_first)]
    assert "static_layer" not in str(variant_config(FULL, "flush-5")["layered_runtime"])
    assert "static_layer" in str(FULL["layered_runtime"])
    stats = [f["typed_config"] for f in _hcm(variant_config(FULL, "stats-all-methods"))["http_filters"]
             if f["name"] == "envoy.filters.http.grpc_stats"]
    assert stats[0]["stats_for_all_methods"] is True and "individual_method_stats_allowlist" not in stats[0]
    assert _hcm(variant_config(FULL, "sampling-1"))["tracing"]["random_sampling"] == {"value": 1.0}
    assert _hcm(FULL)["tracing"]["random_sampling"] == {"value": 100.0}
    with pytest.raises(ValueError, match="unknown variant 'lua'"):
        variant_config(FULL, "lua")


def test_every_step_is_a_config_envoy_accepts(tmp_path: Path) -> None:
    configs = {**step_configs(FULL), **{name: variant_config(FULL, name) for name in VARIANT_NAMES}}
    for name, config in configs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(dump_yaml(with_ports(config, listen_port=18090, admin_port=18091)))
        proc = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path), "-l", "error",
                               "--disable-hot-restart"], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-500:]}{proc.stderr[-500:]}"
