"""The Kubernetes kit (deploy/kubernetes): it renders, every object is schema-valid, and
the properties a reviewer checks by hand hold in every rendering."""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as k8s_schemas

from broker.config import load_settings
from broker.policy.loader import load_policy

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAY = KUSTOMIZE / "overlays" / "example"
RENDERINGS = {"base": KUSTOMIZE, "example": OVERLAY}
# The oldest Kubernetes the kit claims (docs/deploy.md) and the newest the validator ships.
VERSIONS = ("1.29.0", k8s_schemas.latest_version())
WORKLOAD_KINDS = {"Deployment", "Job"}

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed"
)


@cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(RENDERINGS[name])], check=True, capture_output=True, text=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def rendered(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(name)))


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in WORKLOAD_KINDS
    }


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = []
    for version in VERSIONS:
        try:
            k8s_schemas.validate(doc, version, strict=True)
        except Exception as error:  # ValidationError, SchemaNotFoundError: both are failures here
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} against {version}: {error}")
    return errors


pytestmark = needs_kubectl


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(name):
    objects = rendered(name)
    assert objects
    problems = [problem for doc in objects for problem in _schema_errors(doc)]
    assert not problems, "\n".join(problems)


def test_the_validator_catches_a_misspelt_field():
    # Strict schemas refuse unknown fields; without this the test above could pass on
    # anything (an offline validator that silently found no schema, say).
    api = copy.deepcopy(by_kind(rendered("base"), "Deployment")["credential-broker-api"])
    api["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    assert _schema_errors(api)


def test_the_example_workload_pod_is_valid_and_projects_a_broker_token():
    pod = yaml.safe_load((OVERLAY / "workload-example.yaml").read_text())
    assert not _schema_errors(pod)
    [volume] = pod["spec"]["volumes"]
    [source] = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "credential-broker"
    assert 600 <= token["expirationSeconds"] <= 3600


@pytest.mark.parametrize("name", RENDERINGS)
def test_the_expected_objects_are_rendered(name):
    kinds = {
        (
            o["kind"],
            o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"],
        )
        for o in rendered(name)
    }
    assert {
        ("ServiceAccount", "credential-broker"),
        ("ConfigMap", "credential-broker"),
        ("Service", "credential-broker"),
        ("Deployment", "credential-broker-api"),
        ("Deployment", "credential-broker-scheduler"),
        ("Deployment", "credential-broker-gateway"),
        ("Service", "credential-broker-gateway"),
        ("NetworkPolicy", "credential-broker-gateway"),
        ("Job", "credential-broker-migrate"),
        ("PodDisruptionBudget", "credential-broker-api"),
        ("NetworkPolicy", "credential-broker-default-deny"),
    } <= kinds


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_container_runs_locked_down(name):
    for where, spec in pod_specs(rendered(name)).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        tmp = {v["name"]: v for v in spec["volumes"]}["tmp"]
        assert "emptyDir" in tmp, where
        for container in spec.get("initContainers", []) + spec["containers"]:
            at = f"{where} {container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, at
            assert context["readOnlyRootFilesystem"] is True, at
            assert context["allowPrivilegeEscalation"] is False, at
            assert context["capabilities"]["drop"] == ["ALL"], at
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, at
            assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"], at
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), at
            assert "memory" in resources["limits"], at


@pytest.mark.parametrize("name", RENDERINGS)
def test_commands_split_api_scheduler_gateway_and_migration(name):
    objects = rendered(name)
    deployments = by_kind(objects, "Deployment")
    [api] = deployments["credential-broker-api"]["spec"]["template"]["spec"]["containers"]
    [scheduler] = deployments["credential-broker-scheduler"]["spec"]["template"]["spec"]["containers"]
    [migrate] = by_kind(objects, "Job")["credential-broker-migrate"]["spec"]["template"]["spec"]["containers"]
    [gateway] = deployments["credential-broker-gateway"]["spec"]["template"]["spec"]["containers"]
    assert api["command"][:4] == ["broker", "serve", "--no-scheduler", "--no-gateway"]
    assert gateway["command"] == ["broker", "gateway"]
    assert "0.0.0.0:8080" in api["command"]
    assert scheduler["command"][:2] == ["broker", "scheduler"]
    assert migrate["command"] == ["broker", "migrate"]
    assert by_kind(objects, "Job")["credential-broker-migrate"]["spec"]["template"]["spec"][
        "restartPolicy"
    ] in {"OnFailure", "Never"}


@pytest.mark.parametrize("name", RENDERINGS)
def test_the_api_is_probed_on_healthz_and_readyz(name):
    [api] = by_kind(rendered(name), "Deployment")["credential-broker-api"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in api["ports"]


@pytest.mark.parametrize("name", RENDERINGS)
def test_secrets_come_from_the_secret_and_config_from_the_generated_configmap(name):
    objects = rendered(name)
    [configmap] = by_kind(objects, "ConfigMap").values()
    for where, spec in pod_specs(objects).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        # The generated name (with its content hash) is what the pods mount.
        assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"], where
        for container in spec["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["BROKER_CONFIG"]["value"] == "/etc/broker/broker.yaml"
            assert env["BROKER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": "credential-broker",
                "key": "database-url",
            }
            if where.startswith("Deployment/"):
                # Every process that writes or seals audit rows holds the same key.
                assert env["BROKER_AUDIT_KEY"]["valueFrom"]["secretKeyRef"] == {
                    "name": "credential-broker",
                    "key": "audit-key",
                }
            for variable in env.values():
                assert "value" not in variable or "TOKEN" not in variable["name"], where


@pytest.mark.parametrize("name", RENDERINGS)
def test_the_configmap_holds_a_config_and_policy_the_broker_accepts(name, tmp_path):
    [configmap] = by_kind(rendered(name), "ConfigMap").values()
    config = tmp_path / "broker.yaml"
    config.write_text(configmap["data"]["broker.yaml"])
    (tmp_path / "policy.yaml").write_text(configmap["data"]["policy.yaml"])
    settings = load_settings(config, env={"BROKER_DATABASE_URL": "postgresql+psycopg://broker@db/broker"})
    assert str(settings.policy_file) == "/etc/broker/policy.yaml"
    assert settings.vault.auth.jwt_path == "/var/run/secrets/vault/token"
    load_policy(tmp_path / "policy.yaml")


def test_the_example_overlay_trusts_the_cluster_tokens_for_the_workload_pod():
    objects = rendered("example")
    assert {o["metadata"].get("namespace") for o in objects} == {"credential-broker"}
    deployments = by_kind(objects, "Deployment")
    assert deployments["credential-broker-api"]["spec"]["replicas"] == 3
    for deployment in deployments.values():
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example.org/platform/credential-broker:0.1.0"
    [configmap] = by_kind(objects, "ConfigMap").values()
    config = yaml.safe_load(configmap["data"]["broker.yaml"])
    k8s = {issuer["name"]: issuer for issuer in config["issuers"]}["k8s"]
    assert k8s["kind"] == "oidc"
    assert k8s["audiences"] == ["credential-broker"]
    assert k8s["jwks_uri"].startswith(k8s["issuer"])
    pod = yaml.safe_load((OVERLAY / "workload-example.yaml").read_text())
    subject = f"system:serviceaccount:{pod['metadata']['namespace']}:{pod['spec']['serviceAccountName']}"
    policy = yaml.safe_load(configmap["data"]["policy.yaml"])
    entries = [w for task in policy["tasks"].values() for w in task["workloads"]]
    assert {"issuer": "k8s", "subject": subject} in entries


def test_a_disruption_budget_and_network_policies_cover_the_api():
    objects = rendered("base")
    [budget] = by_kind(objects, "PodDisruptionBudget").values()
    api = by_kind(objects, "Deployment")["credential-broker-api"]
    assert budget["spec"]["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] < api["spec"]["replicas"]
    policies = by_kind(objects, "NetworkPolicy")
    assert policies["credential-broker-default-deny"]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [
        p["port"] for rule in policies["credential-broker-api"]["spec"]["ingress"] for p in rule["ports"]
    ]
    assert ingress_ports == [8080]


def test_the_example_database_policy_admits_only_the_gateway_and_vault():
    [policy] = yaml.safe_load_all((OVERLAY / "database-networkpolicy.yaml").read_text())
    assert not _schema_errors(policy)
    [rule] = policy["spec"]["ingress"]
    components = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert {
        "app.kubernetes.io/name": "credential-broker",
        "app.kubernetes.io/component": "gateway",
    } in components
    assert all(peer.get("podSelector") for peer in rule["from"])  # no peer admits a whole namespace
    gateway = by_kind(rendered("base"), "Service")["credential-broker-gateway"]
    assert gateway["spec"]["ports"][0]["port"] == 6432
