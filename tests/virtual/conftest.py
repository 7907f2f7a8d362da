"""Fixtures for the end-to-end tests of virtual repositories with real clients (test_clients_*).

* `e2e_cluster` (session): two cargohold nodes of one cluster on the session's etcd, one on each
  server runtime (uvicorn/asyncio, hypercorn/trio). Each test declares its own repositories
  through the CLI (`cargohold repo add ... --remote` / `--virtual`) under names of its own
  (`e2e_names`), so tests share the nodes but never a definition or an image.
* `e2e_upstream` (session): Debian's `docker-registry` (CNCF Distribution) with its access log on,
  the upstream of the remote members; `seed()` puts an image there with `skopeo copy`, as a user
  would. `e2e_upstreams` starts more of them for one test (one to kill).
* `e2e_ctr`: a private containerd daemon (`tests/support/containerd.py`) and its `ctr`.

Fixture names start with `e2e_`: tests/virtual is shared with the node's own tests.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import Cluster
from tests.pullthrough.conftest import (MANIFEST_ACCEPT, UpstreamRegistry, Upstreams, wait_until_routed)
from tests.support.containerd import containerd_or_skip
from tests.support.node import NodeProcess
from tests.support.oci import Image, layout_manifest, read_oci_layout
from tests.support.skopeo import copy, docker_ref, oci_ref

E2E_RUNTIMES = {"v1": "asyncio", "v2": "trio"}     # node -> server runtime: uvicorn, hypercorn-trio
MEMBER_HEADER = "X-Cargohold-Member"


class VirtualCluster(Cluster):
    """Nodes of one cluster, and the CLI that declares repositories in it."""

    @property
    def members(self) -> list[NodeProcess]:
        return list(self.nodes.values())

    def repo_add(self, name: str, *options: str) -> None:
        """`cargohold repo add NAME OPTIONS`, which must succeed; then wait until every node follows
        the definition (a manifest DELETE under it is refused DENIED: remote and virtual
        repositories take no deletes, while a local name would answer 404)."""
        done = self.cli("repo", "add", name, *options)
        assert done.returncode == 0, f"repo add {name} {options}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        for node in self.members:
            if node.alive():
                wait_until_routed(node, name)

    def add_remote(self, name: str, url: str, *options: str) -> str:
        self.repo_add(name, "--remote", url, *options)
        return name

    def add_virtual(self, name: str, members: list[str], *options: str) -> str:
        self.repo_add(name, "--virtual", "--members", ",".join(members), *options)
        return name


@pytest.fixture(scope="session")
def e2e_cluster(etcd, tmp_path_factory) -> VirtualCluster:
    cluster = VirtualCluster(etcd.url, tmp_path_factory.mktemp("virtual-cluster"), f"vr-{uuid.uuid4().hex[:8]}")
    try:
        for node_id, runtime in E2E_RUNTIMES.items():
            cluster.add(node_id, args=["--runtime", runtime])     # the last --runtime wins
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(scope="session")
def e2e_upstream(tmp_path_factory) -> UpstreamRegistry:
    with Upstreams(tmp_path_factory.mktemp("virtual-upstream")) as started:
        yield started.distribution()


@pytest.fixture
def e2e_upstreams(tmp_path) -> Upstreams:
    """Upstreams of one test (a test may kill them), stopped at its end."""
    with Upstreams(tmp_path) as started:
        yield started


@dataclass(frozen=True)
class Names:
    """Names of one test, the issue's words with a suffix of the test's own: `dev` (the virtual
    repository), `team_a` (a local namespace, its deployment target), `hub` (a remote repository),
    `outer` (a virtual repository over `dev`)."""
    dev: str
    team_a: str
    hub: str
    outer: str

    @classmethod
    def fresh(cls) -> "Names":
        suffix = uuid.uuid4().hex[:6]
        return cls(f"dev-{suffix}", f"team-a-{suffix}", f"hub-{suffix}", f"outer-{suffix}")


@pytest.fixture
def e2e_names() -> Names:
    return Names.fresh()


@pytest.fixture(scope="session")
def e2e_ctr(tmp_path_factory):
    with containerd_or_skip(tmp_path_factory.mktemp("virtual-containerd") / "root") as run:
        yield run


# -- what a node answers through a name --------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    status: int
    digest: str | None      # Docker-Content-Digest
    member: str | None      # X-Cargohold-Member: the candidate repository that served it
    elapsed: float


def served(node: NodeProcess, name: str, reference: str, *, timeout: float = 60) -> Served:
    """A manifest GET of `name:reference` on `node`: who served what."""
    response = httpx.get(f"{node.url}/v2/{name}/manifests/{reference}", timeout=timeout,
                         headers={"Accept": ", ".join(MANIFEST_ACCEPT)})
    return Served(response.status_code, response.headers.get("Docker-Content-Digest"),
                  response.headers.get(MEMBER_HEADER), response.elapsed.total_seconds())


def skopeo_push(node, workdir: Path, name: str, tag: str, image: Image) -> str:
    """`skopeo copy` of `image` to `node`'s `name:tag`, as a user pushes (synchronous); its digest."""
    return UpstreamRegistry(node).seed(workdir, name, tag, image)


async def pull_identical(node, name: str, tag: str, image: Image, workdir: Path) -> None:
    """`skopeo copy` of `name:tag` from `node` into an OCI layout: the manifest and every blob are
    `image`'s bytes."""
    layout = workdir / f"pulled-{uuid.uuid4().hex[:8]}"
    await copy(docker_ref(node.host_port, name, tag), oci_ref(layout, tag))
    entry, manifest = layout_manifest(layout, tag)
    assert (entry["digest"], manifest) == (image.digest, image.manifest), f"{name}:{tag} from {node.url}"
    blobs = read_oci_layout(layout)[1]
    for blob_digest, data in image.blobs.items():
        assert blobs[blob_digest] == data, f"{blob_digest} of {name}:{tag} from {node.url}"
