"""deploy/kubernetes: every manifest is valid for a pinned Kubernetes version, the
kustomization applies every file of its directory, the StatefulSet is wired as the README says,
and the single-Pod example serves pulls under `podman kube play`.

Validation is offline: kubernetes-validate ships the API schemas. `kubectl kustomize` is used
when kubectl is installed (Debian's kubernetes-client or any other), to validate what
`kubectl apply -k` would send too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.clients import pull, push_test_image, wait_ready, write_htpasswd
from tests.deploy.conftest import require
from tests.support.node import free_port

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


# -- the single-Pod example under `podman kube play` -----------------------------------------
SINGLE_POD = DEPLOY / "examples" / "single-pod.yaml"
KUBE_NETWORK = "podman-default-kube-network"     # what `podman kube play` attaches pods to


def _playable_single_pod(image: str, port: int, htpasswd_dir: Path) -> list[dict]:
    """The example as a test runs it: the test image, a free loopback port, and the users from
    a host directory (podman 4.3 leaves Secret volumes without their values; the Secret itself
    is checked by the validation tests above)."""
    docs = documents(SINGLE_POD)
    pod = next(d for d in docs if d["kind"] == "Pod")
    (container,) = pod["spec"]["containers"]
    container["image"] = image
    (http,) = container["ports"]
    assert http["hostIP"] == "127.0.0.1"
    http["hostPort"] = port
    (users,) = [v for v in pod["spec"]["volumes"] if "secret" in v]
    del users["secret"]
    users["hostPath"] = {"path": str(htpasswd_dir), "type": "Directory"}
    return [d for d in docs if d["kind"] != "Secret"]


def test_single_pod_serves_pulls_under_podman_kube_play(podman, cargohold_image, tmp_path):
    require("skopeo")
    users = tmp_path / "users"
    users.mkdir()
    write_htpasswd(users / "htpasswd")
    host_port = f"127.0.0.1:{free_port()}"
    played = tmp_path / "single-pod.yaml"
    docs = _playable_single_pod(cargohold_image.tag, int(host_port.rpartition(":")[2]), users)
    played.write_text(yaml.safe_dump_all(docs))
    kube_network_was_there = podman.run("network", "exists", KUBE_NETWORK, check=False).returncode == 0
    podman.run("kube", "play", str(played), timeout=180)
    try:
        wait_ready(host_port)
        pushed = push_test_image(host_port, "try/it", tmp_path)
        assert pull(host_port, "try/it", tmp_path) == pushed
    except BaseException:
        logs = podman.run("logs", "--tail", "40", "cargohold-single-cargohold", check=False)
        print(logs.stdout, logs.stderr)
        raise
    finally:
        podman.run("kube", "down", str(played), timeout=180)
        if not kube_network_was_there:
            podman.run("network", "rm", KUBE_NETWORK, check=False)
