"""A real kube-apiserver (1.20, built once per machine by charts/tools/build-kube-apiserver.sh) on a
free loopback port, storing into the test etcd under its own prefix. No controllers, no kubelet:
enough for CRDs, RBAC, service-account tokens and patches, which is all mesh-sync touches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.ports import free_port
from tests.fixtures.etcd import EtcdServer

BUILD_SCRIPT = "charts/tools/build-kube-apiserver.sh"
START_TIMEOUT_S = 60.0
ADMIN_TOKEN = "sluice-test-admin"
ISSUER = "https://kubernetes.default.svc"

VIRTUAL_SERVICE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "virtualservices.networking.istio.io"},
    "spec": {
        "group": "networking.istio.io",
        "names": {"kind": "VirtualService", "listKind": "VirtualServiceList", "plural": "virtualservices",
                  "singular": "virtualservice", "shortNames": ["vs"]},
        "scope": "Namespaced",
        # The shape is checked offline against Istio's schemas (tests/charts); here only the API
        # semantics matter (resourceVersion, JSON patch, RBAC), so the spec is left open.
        "versions": [{"name": version, "served": True, "storage": version == "v1",
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
                     for version in ("v1", "v1beta1")],
    },
}


def apiserver_binary() -> str:
    """The cached kube-apiserver, or skip saying how to build it."""
    explicit = os.environ.get("SLUICE_KUBE_APISERVER")
    cache = Path(os.environ.get("SLUICE_TOOLS_CACHE", Path.home() / ".cache" / "sluice-tools"))
    candidates = [Path(explicit)] if explicit else [cache / "kube-apiserver-1.20.2" / "kube-apiserver"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("kube-apiserver")
    if found:
        return found
    pytest.skip(f"no kube-apiserver on this machine: build it once with `bash {BUILD_SCRIPT}` (~9 min, cached)")


@dataclass
class KubeApiServer:
    """A running API server: its URL, CA file and an admin kubeconfig."""

    url: str
    ca_file: Path
    workdir: Path
    process: subprocess.Popen[bytes]

    def kubeconfig(self, token: str, name: str) -> Path:
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
        }))
        return path

    def admin_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig(ADMIN_TOKEN, "admin")))

    def log_text(self) -> str:
        return (self.workdir / "apiserver.log").read_text(errors="replace")[-4000:]


def _make_keys(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available to create the service-account signing key")
    key, pub = directory / "sa.key", directory / "sa.pub"
    subprocess.run([openssl, "genrsa", "-out", str(key), "2048"], check=True, capture_output=True, timeout=60)
    subprocess.run([openssl, "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True,
                   timeout=60)
    return key, pub


def _ready(url: str, ca_file: Path) -> bool:
    if not ca_file.exists():
        return False
    context = ssl.create_default_context(cafile=str(ca_file))
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


@contextlib.contextmanager
def run_apiserver(workdir: Path, etcd: EtcdServer) -> Iterator[KubeApiServer]:
    binary = apiserver_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    key, pub = _make_keys(workdir)
    tokens = workdir / "tokens.csv"
    tokens.write_text(f"{ADMIN_TOKEN},admin,uid-admin,system:masters\n")
    port = free_port()
    certs = workdir / "certs"
    argv = [
        binary,
        f"--etcd-servers={etcd.url}", f"--etcd-prefix=/kube-{uuid.uuid4().hex[:8]}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}", "--insecure-port=0",
        f"--cert-dir={certs}", f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
        f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
        f"--service-account-key-file={pub}", f"--service-account-signing-key-file={key}",
        "--service-cluster-ip-range=10.96.0.0/24", "--enable-priority-and-fairness=false",
        "--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none",
    ]
    log = (workdir / "apiserver.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    server = KubeApiServer(f"https://127.0.0.1:{port}", certs / "apiserver.crt", workdir, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(server.url, server.ca_file):
            if process.poll() is not None:
                pytest.fail(f"kube-apiserver exited with {process.returncode}:\n{server.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"kube-apiserver not ready after {START_TIMEOUT_S}s:\n{server.log_text()}")
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
