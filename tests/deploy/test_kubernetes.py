"""deploy/kubernetes: every manifest is valid for a pinned Kubernetes version, the
kustomization applies every file of its directory, the StatefulSet is wired as the README says,
and the single-Pod example serves pulls under `podman kube play`.

Validation is offline: kubernetes-validate ships the API schemas. `kubectl kustomize` is used
when it is installed (it is not a Debian package here), to validate the built output too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

KUBERNETES_VERSION = "1.31.0"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/kubernetes except the kustomization itself."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p != KUSTOMIZATION)


def validation_errors(doc: dict) -> str | None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import ValidationError

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        return f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}"
    return None


def find(kind: str, name: str) -> dict:
    for path in manifest_files():
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} under {DEPLOY}")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_is_valid(path):
    docs = documents(path)
    assert docs, f"{path} has no document"
    errors = [e for e in map(validation_errors, docs) if e]
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_file_of_its_directory():
    listed = set(yaml.safe_load(KUSTOMIZATION.read_text())["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml") if p != KUSTOMIZATION}
    assert listed == present, f"missing from kustomization.yaml: {sorted(present - listed)}; " \
                              f"listed but absent: {sorted(listed - present)}"


def test_kustomize_build_is_valid():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it carries kustomize); the files were validated one by one")
    built = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    errors = [e for e in map(validation_errors, docs) if e]
    assert not errors, "\n".join(errors)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("StatefulSet", "cargohold") in kinds and ("StatefulSet", "etcd") in kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["CARGOHOLD_ETCD"].count("etcd-") == 3


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_node_identity_survives_restarts_and_peers_dial_the_stable_name():
    nodes = find("StatefulSet", "cargohold")
    env = _env(_container(nodes))
    assert env["CARGOHOLD_NODE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "metadata.labels['cargohold.io/site']" in env["CARGOHOLD_SITE"]["fieldRef"]["fieldPath"]
    peers = find("Service", nodes["spec"]["serviceName"])
    assert peers["spec"]["clusterIP"] == "None"
    assert env["CARGOHOLD_GRPC_ADVERTISE"] == f"$(CARGOHOLD_NODE_ID).{peers['metadata']['name']}:5001"
    assert [t["metadata"]["name"] for t in nodes["spec"]["volumeClaimTemplates"]] == ["data"]


def test_a_restart_never_drains_a_node():
    """SIGTERM comes with every restart, rollout and eviction: no hook may start a leave."""
    container = _container(find("StatefulSet", "cargohold"))
    hooks = yaml.safe_dump(container.get("lifecycle", {}))
    assert "leave" not in hooks


def test_probes_resources_and_security_context():
    for name in ("cargohold", "etcd"):
        workload = find("StatefulSet", name)
        container = _container(workload)
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        budget = find("PodDisruptionBudget", name)
        assert budget["spec"]["maxUnavailable"] == 1
    node = _container(find("StatefulSet", "cargohold"))
    assert node["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert node["livenessProbe"]["httpGet"]["path"] == "/healthz"
