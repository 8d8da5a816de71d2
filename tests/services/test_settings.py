"""Settings precedence: CLI flag > environment (``SLUICE_…``) > ``--config`` file > default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.settings import ServiceSettings, load_settings
from tests.fixtures.service import ServiceHandle
from tests.services import models


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ServiceSettings.model_fields:
        monkeypatch.delenv(f"SLUICE_{name.upper()}", raising=False)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump({"port": 7001, "grace_period": 3.5, "log_level": "warning",
                                    "repo": "/from/file"}))
    return path


def test_defaults() -> None:
    settings = load_settings({})
    assert (settings.port, settings.metrics_port, settings.grace_period) == (8001, 8002, 10.0)
    assert settings.repo == Path("models")


def test_config_file_beats_defaults(config_file: Path) -> None:
    settings = load_settings({"port": None}, config_file)
    assert (settings.port, settings.grace_period, settings.log_level) == (7001, 3.5, "warning")
    assert settings.repo == Path("/from/file")


def test_environment_beats_config_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_PORT", "7002")
    monkeypatch.setenv("SLUICE_LOG_LEVEL", "error")
    settings = load_settings({"port": None, "log_level": None}, config_file)
    assert (settings.port, settings.log_level, settings.grace_period) == (7002, "error", 3.5)


def test_flag_beats_environment_and_config_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_PORT", "7002")
    settings = load_settings({"port": 7003, "grace_period": None}, config_file)
    assert (settings.port, settings.grace_period) == (7003, 3.5)


def test_config_file_does_not_leak_into_later_loads(config_file: Path) -> None:
    load_settings({}, config_file)
    assert load_settings({}).port == 8001


def test_invalid_values_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings({}, tmp_path / "missing.yaml")
    with pytest.raises(ValidationError, match="port"):
        load_settings({"port": 70000})
    monkeypatch.setenv("SLUICE_GRACE_PERIOD", "-1")
    with pytest.raises(ValidationError, match="grace_period"):
        load_settings({})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("colour: blue\n")
    with pytest.raises(ValidationError, match="colour"):
        load_settings({}, unknown)


@pytest.mark.slow
def test_cli_flag_wins_in_the_real_process(start_service: Callable[..., ServiceHandle], tmp_path: Path,
                                           config_file: Path) -> None:
    repo = tmp_path / "repo"
    models.write_model(repo, "good", models.identity("FP32"))
    # Environment and file both name other ports; the fixture's --port flag must win over both.
    handle = start_service(repo, "--config", str(config_file), env={"SLUICE_PORT": "1"})
    assert handle.ready()
    assert "7001" not in handle.process.log_text()
