"""The committed ``*_pb2*`` files must be exactly what ``python -m protos.generate`` produces."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def _generate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protos.generate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_generated_code_is_up_to_date() -> None:
    result = _generate(REPO_ROOT, "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_reports_drift_and_generate_fixes_it(tmp_path: Path) -> None:
    # Work on a copy so the real checkout is never touched.
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    inference = tmp_path / "protos" / "inference"
    pb2 = inference / "grpc_service_pb2.py"
    pb2.write_text(pb2.read_text(encoding="utf-8") + "# edited by hand\n", encoding="utf-8")
    (inference / "model_config_pb2.pyi").unlink()
    (inference / "model_config_pb2_grpc.py").write_text("# no service in model_config.proto\n")

    result = _generate(tmp_path, "--check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "out of date: protos/inference/grpc_service_pb2.py" in result.stderr
    assert "missing: protos/inference/model_config_pb2.pyi" in result.stderr
    assert "stale (no longer generated): protos/inference/model_config_pb2_grpc.py" in result.stderr

    result = _generate(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _generate(tmp_path, "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    for generated in sorted((REPO_ROOT / "protos" / "inference").glob("*_pb2*")):
        assert (inference / generated.name).read_bytes() == generated.read_bytes(), generated.name
    assert not (inference / "model_config_pb2_grpc.py").exists()


def test_check_reports_a_stale_descriptor_set(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    descriptor = tmp_path / "protos" / "inference" / "grpc_service.descriptor.pb"
    descriptor.write_bytes(descriptor.read_bytes()[:-10])
    result = _generate(tmp_path, "--check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "out of date: protos/inference/grpc_service.descriptor.pb" in result.stderr
    descriptor.unlink()
    result = _generate(tmp_path, "--check")
    assert "missing: protos/inference/grpc_service.descriptor.pb" in result.stderr
    assert _generate(tmp_path).returncode == 0
    assert descriptor.read_bytes() == (REPO_ROOT / "protos" / "inference" / "grpc_service.descriptor.pb").read_bytes()
