"""helm for the chart tests: installed once per machine by charts/tools/install-helm.sh, run here."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sluice"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"
RELEASE = "demo"
NAMESPACE = "models"
KUBE_VERSION = "1.30.0"
"""The oldest Kubernetes the chart supports (Chart.yaml kubeVersion); schemas of this version."""


class HelmUnavailableError(RuntimeError):
    """helm could not be installed on this machine (why is in the message)."""


@functools.cache
def helm_binary() -> str:
    """Path of helm v4; from $SLUICE_HELM, else installed into the tools cache by the script."""
    if os.environ.get("SLUICE_HELM"):
        return os.environ["SLUICE_HELM"]
    script = ROOT / "charts" / "tools" / "install-helm.sh"
    try:
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HelmUnavailableError(f"{script.name} did not finish: {exc}") from exc
    if result.returncode != 0:
        raise HelmUnavailableError(f"{script.name} failed: {result.stderr.strip()[-500:]}")
    return str(Path(result.stdout.strip().splitlines()[-1]) / "helm")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def template_args(values: Path | None = None, *sets: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return args


def render(values: Path | None = None, *sets: str) -> str:
    return helm(*template_args(values, *sets)).stdout


def documents(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]
