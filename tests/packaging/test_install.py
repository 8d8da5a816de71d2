"""sluice installs as docs/install.md says: its metadata builds without deprecation warnings, and a
wheelhouse of the locked runtime set installs it into a fresh venv with the network off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.packaging.locks import ROOT


def _offline_env() -> dict[str, str]:
    """The environment of an air-gapped machine's pip: no config file, no index or find-links of ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "UV_"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _without_network() -> list[str]:
    """A command prefix that cuts the network (a new, empty network namespace) where Linux allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True, check=False).returncode == 0:
        return [unshare, "-rn"]
    return []  # --no-index alone then keeps pip off the network


def test_metadata_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    """The SPDX `license` string: setuptools warned about the `project.license` table on every install."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "out").mkdir()
    build = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import sys, setuptools.build_meta as backend; print(backend.prepare_metadata_for_build_wheel(sys.argv[1]))",
         str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert build.returncode == 0, build.stderr
    assert "Deprecat" not in build.stderr, build.stderr
    metadata = (tmp_path / "out" / build.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheelhouse_installs_offline_into_a_fresh_venv(tmp_path: Path) -> None:
    """docs/install.md's air-gapped install: `bash .ci/wheelhouse runtime DIR` (needs the package index),
    then pip with --no-index in a venv without network. About a minute: 70 MB of wheels, one install."""
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run(["bash", str(ROOT / ".ci" / "wheelhouse"), "runtime", str(wheelhouse)],
                           capture_output=True, text=True, timeout=420, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    assert list(wheelhouse.glob("sluice_mesh-*.whl"))
    assert not [path.name for path in wheelhouse.iterdir() if not path.name.endswith((".whl", ".txt"))]

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    env = _offline_env()
    install = subprocess.run(
        [*_without_network(), str(fresh / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index",
         "--find-links", str(wheelhouse), "--require-hashes", "-r", str(wheelhouse / "requirements.txt")],
        capture_output=True, text=True, env=env, timeout=420, check=False)
    assert install.returncode == 0, install.stdout + install.stderr

    cli = subprocess.run([str(fresh / "bin" / "sluice"), "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert "serve" in cli.stdout
    imported = subprocess.run(
        [str(fresh / "bin" / "python"), "-c",
         "import onnxruntime, services.command, gateway, mesh.cli; print(onnxruntime.get_available_providers())"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert imported.returncode == 0, imported.stderr
    assert "CPUExecutionProvider" in imported.stdout
