"""Envoy's command lines (hot restart on and off) and ``sluice gateway --write-bootstrap``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.envoy import EnvoyProcess
from tests.fixtures.service import sluice_argv


def test_hot_restart_chain_flags(tmp_path: Path) -> None:
    envoy = EnvoyProcess("/bin/envoy", tmp_path / "boot.yaml", concurrency=2)
    first = envoy.argv(0)
    assert first[:3] == ["/bin/envoy", "-c", str(tmp_path / "boot.yaml")]
    assert "--reject-unknown-dynamic-fields" in first and "--disable-hot-restart" not in first
    assert first[-3:] == ["--use-dynamic-base-id", "--base-id-path", str(tmp_path / "boot.yaml.base-id")]
    envoy._base_id = 17  # what the first epoch wrote into --base-id-path
    assert envoy.argv(2)[-4:] == ["--base-id", "17", "--restart-epoch", "2"]


def test_without_hot_restart(tmp_path: Path) -> None:
    argv = EnvoyProcess("/bin/envoy", tmp_path / "boot.yaml", hot_restart=False).argv()
    assert argv[-1] == "--disable-hot-restart" and "--restart-epoch" not in argv


async def test_hot_restart_refused_without_it(tmp_path: Path) -> None:
    from gateway.errors import GatewayError

    with pytest.raises(GatewayError, match="disable-hot-restart"):
        await EnvoyProcess("/bin/envoy", tmp_path / "boot.yaml", hot_restart=False).hot_restart()


@pytest.mark.timeout(60)
def test_write_bootstrap_gives_an_external_envoy_everything_to_start(tmp_path: Path) -> None:
    xds, path = tmp_path / "xds", tmp_path / "envoy.yaml"
    argv = sluice_argv("gateway", "--xds-dir", str(xds), "--admin-port", "19555", "--listen-port", "18555",
                       "--etcd", "127.0.0.1:1", "--log-format", "json", "--write-bootstrap", str(path))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(path)
    config = yaml.safe_load(path.read_text())
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19555}
    lds = config["dynamic_resources"]["lds_config"]["path_config_source"]
    assert lds == {"path": f"{xds}/lds.yaml", "watched_directory": {"path": str(xds)}}
    # Envoy exits when a file its bootstrap names is missing: a first snapshot is there.
    listener = yaml.safe_load((xds / "lds.yaml").read_text())
    assert "18555" in str(listener)
    assert (xds / "cds.yaml").is_file() and (xds / "rds.yaml").is_file()
    # A second run keeps what is published.
    before = (xds / "..data").resolve()
    assert subprocess.run(argv, capture_output=True, timeout=50, check=False).returncode == 0
    assert (xds / "..data").resolve() == before
