"""Fixtures for the pull-through cache's tests.

Engine tests (test_cache_*, test_fill_*): a real upstream (CNCF Distribution, Debian's
`docker-registry`) with test images, a cargohold node on the shared etcd, and remote repositories
defined in etcd while the node runs (as `cargohold repo add` does): each test defines its own, so
caches never overlap.

End-to-end tests with real clients and faults (test_clients_*, test_faults_*):
* `cache_cluster` (module): three cargohold nodes on the session's etcd, one cluster. Each test
  declares its own remote repository (`cache_cluster.add_remote(...)`, through the CLI
  `cargohold repo add`) over its own upstream, so tests share the nodes but not their state. A
  test that kills a node starts it again before it ends.
* `upstreams`: starts Debian's `docker-registry` (CNCF Distribution 2.8.2), plain or with htpasswd
  Basic auth, with its own access log; `seed()` puts an image into it with `skopeo copy`, as a user
  would. Everything started is stopped at the end of the test.
* `bearer_upstream` (module): a second cargohold with `--auth on`, the Docker token flow, with an
  image pushed by skopeo with a robot's credentials.

The upstream's own access log is the ground truth for "how many times was the upstream asked".
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.repositories.definitions import RemoteRepository
from tests.cluster.conftest import Cluster
from tests.support.accesslog import settled_log
from tests.support.distribution import DistributionProcess
from tests.support.node import REPO_ROOT, NodeProcess
from tests.support.oci import Image, build_image, build_index, describe, push_image, write_oci_layout
from tests.support.poll import eventually, until
from tests.support.skopeo import SKOPEO

# == engine tests: one node, definitions written to etcd ==========================================
REPO = "team/app"


@dataclass
class Upstream:
    process: DistributionProcess
    image: Image        # team/app:v1
    index: Image        # team/app:multi

    @property
    def url(self) -> str:
        return self.process.url

    def count(self, path_contains: str, method: str | None = None) -> int:
        return len(self.process.requests(path_contains, method))


async def push(url: str, repo: str, tag: str, image: Image, auth: tuple[str, str] | None = None) -> str:
    async with httpx.AsyncClient(base_url=url, auth=auth, timeout=30) as client:
        return await push_image(client, repo, tag, image)


@contextmanager
def running_upstream(path, users: dict[str, str] | None = None) -> Iterator[Upstream]:
    """A Distribution upstream with the test images, stopped at the end."""
    registry = start_upstream(path, users)
    try:
        yield registry
    finally:
        registry.process.stop()


@asynccontextmanager
async def client_of(process: NodeProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=process.url, timeout=60) as c:
        yield c


def start_upstream(path, users: dict[str, str] | None = None) -> Upstream:
    process = DistributionProcess(path, users=users).start()
    image, index = build_image("pt-image"), build_index("pt-index")
    auth = next(iter(users.items())) if users else None

    async def fill() -> None:
        await push(process.url, REPO, "v1", image, auth)
        await push(process.url, REPO, "multi", index, auth)

    anyio.run(fill, backend="trio")
    return Upstream(process, image, index)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with running_upstream(tmp_path_factory.mktemp("upstream")) as registry:
        yield registry


@contextmanager
def running_node(data, etcd, cluster: str, *extra_args: str, **settings) -> Iterator[NodeProcess]:
    """A cargohold node with an audit log (`data/audit.log`), stopped at the end."""
    process = NodeProcess(data, etcd_url=etcd.url, cluster=cluster,
                          extra_args=["--audit-log", str(data / "audit.log"), *extra_args], **settings).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, etcd, cluster_name):
    with running_node(tmp_path_factory.mktemp("node"), etcd, cluster_name) as process:
        yield process


@pytest.fixture
async def client(node):
    async with client_of(node) as c:
        yield c


def unique(prefix: str = "r") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def define(etcd, cluster: str, definition: RemoteRepository, *, replace: bool = False) -> None:
    async with EtcdClient([etcd.url]) as etcd_client:
        await ClusterMetadata(etcd_client, cluster, "test").define_repository(definition, replace=replace)


async def remove(etcd, cluster: str, name: str) -> None:
    async with EtcdClient([etcd.url]) as etcd_client:
        await ClusterMetadata(etcd_client, cluster, "test").remove_definition(name)


async def wait_routed(client: httpx.AsyncClient, name: str) -> None:
    """Until the node serves `name` as a remote repository (a push there is refused DENIED: no
    upstream request)."""
    async def denied() -> bool:
        response = await client.post(f"/v2/{name}/x/blobs/uploads/")
        return response.status_code == 403
    await eventually(denied, what=f"{name} routed as a remote repository")


async def remote(etcd, cluster: str, client: httpx.AsyncClient, url: str, **settings) -> RemoteRepository:
    """Define a new remote repository of `url` and wait until the node follows it."""
    definition = RemoteRepository(name=settings.pop("name", None) or unique(), url=url, **settings)
    await define(etcd, cluster, definition)
    await wait_routed(client, definition.name)
    return definition


# == end-to-end: three nodes, real clients, the CLI, faults ===========================================
BASIC_USERS = {"puller": "puller-pass-31c9"}
NODE_IDS = ("n1", "n2", "n3")
ABSENT_MANIFEST = "sha256:" + "0" * 64
CACHE_HEADER = "X-Cargohold-Cache"
UPSTREAM_READ_TIMEOUT = 30.0      # seconds the nodes wait for a silent upstream


# -- the cache under test ---------------------------------------------------------------------------
class CacheCluster(Cluster):
    """Three nodes of one cluster, and the CLI to declare remote repositories in it."""

    @property
    def members(self) -> list[NodeProcess]:
        return [self.nodes[node_id] for node_id in NODE_IDS]

    def cli(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cargohold", *args, "--etcd", self.etcd_url,
                               "--cluster", self.name], cwd=REPO_ROOT, capture_output=True, text=True,
                              input=input, timeout=timeout)

    def add_remote(self, name: str, url: str, *options: str, username: str | None = None,
                   password: str | None = None) -> str:
        """`cargohold repo add NAME --remote URL OPTIONS` (the password through stdin), then wait
        until every node follows it. Returns NAME."""
        credentials = ["--username", username, "--password-stdin"] if username else []
        done = self.cli("repo", "add", name, "--remote", url, *credentials, *options,
                        input=None if password is None else password + "\n")
        assert done.returncode == 0, f"repo add {name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        for node in self.members:
            if node.alive():
                wait_until_routed(node, name)
        return name

    def start_all(self) -> None:
        with ThreadPoolExecutor(len(NODE_IDS)) as pool:
            list(pool.map(NodeProcess.start, self.members))


def wait_until_routed(node: NodeProcess, name: str) -> None:
    """Until `node` treats `name/...` as a remote repository: a delete there is refused DENIED
    (and a local name would answer 404 for this absent manifest, so the probe changes nothing)."""
    url = f"{node.url}/v2/{name}/probe/manifests/{ABSENT_MANIFEST}"
    until(lambda: httpx.delete(url, timeout=10).status_code == 403, interval=0.1,
          what=f"{node.url} routes {name}/ to the remote repository")


@pytest.fixture(scope="module")
def cache_cluster(etcd, tmp_path_factory) -> CacheCluster:
    """Per module, not per session: live nodes keep writing to the shared etcd (leases, status),
    and tests elsewhere that count etcd revisions must not see them."""
    cluster = CacheCluster(etcd.url, tmp_path_factory.mktemp("cache-cluster"), f"pt-{uuid.uuid4().hex[:8]}")
    for node_id in NODE_IDS:
        cluster.add(node_id, start=False)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def remote_name(request) -> str:
    """A fresh remote repository name for one test."""
    slug = re.sub(r"[^a-z0-9]+", "", request.node.name.lower())[-20:]
    return f"pt{slug}{uuid.uuid4().hex[:6]}"


@pytest.fixture
def restart_killed(cache_cluster):
    """Yields; afterwards starts again any cluster node a test killed (the cluster is shared)."""
    yield
    for node in cache_cluster.members:
        if not node.alive():
            node.start()


# -- upstream registries ----------------------------------------------------------------------------
@dataclass
class UpstreamRegistry:
    """A registry the cache fetches from: Distribution, or a cargohold with token auth."""
    process: NodeProcess
    credentials: tuple[str, str] | None = None      # for seeding it

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def host_port(self) -> str:
        return self.process.host_port

    def seed(self, workdir: Path, name: str, tag: str, image: Image) -> str:
        """`skopeo copy --all` an OCI layout holding `image` (an index with all its children) to
        `name:tag` here, as a user would (run synchronously: fixtures and tests call it alike); the
        manifest digest."""
        layout = write_oci_layout(workdir / f"seed-{uuid.uuid4().hex[:8]}", {tag: image})
        creds = ["--dest-creds", ":".join(self.credentials)] if self.credentials else ["--dest-no-creds"]
        done = subprocess.run([SKOPEO, "--insecure-policy", "copy", "--all", "--dest-tls-verify=false", *creds,
                               f"oci:{layout}:{tag}", f"docker://{self.host_port}/{name}:{tag}"],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"seeding {name}:{tag} failed:\n{done.stderr[-2000:]}"
        return image.digest

    def logged(self, path_contains: str, method: str | None = None) -> list:
        """The upstream's own access-log entries (Distribution only)."""
        return self.process.requests(path_contains, method)

    # faults
    def stall(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        self.process.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.process.kill()


class Upstreams:
    """Distribution upstreams started for a test or a module; all stopped on leaving `with`."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[UpstreamRegistry] = []

    def __enter__(self) -> "Upstreams":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def distribution(self, *, basic: bool = False) -> UpstreamRegistry:
        users = BASIC_USERS if basic else None
        process = DistributionProcess(self.tmp_path / f"distribution-{len(self.started)}", users=users).start()
        upstream = UpstreamRegistry(process, next(iter(users.items())) if users else None)
        self.started.append(upstream)
        return upstream

    def stop_all(self) -> None:
        for upstream in self.started:
            if upstream.process.alive():
                upstream.resume()          # a SIGSTOPped registry would not hear SIGTERM
                upstream.process.kill()


@pytest.fixture
def upstreams(tmp_path) -> Upstreams:
    with Upstreams(tmp_path) as started:
        yield started


@pytest.fixture(scope="module")
def bearer_upstream(tmp_path_factory, etcd) -> UpstreamRegistry:
    """A cargohold with `--auth on` (tests/auth's accounts and rules: the robot `ci` pushes to
    team/**, the user `alice` may pull it through the token flow, anonymous may not)."""
    from tests.auth.conftest import start_secured

    secured = start_secured(tmp_path_factory, etcd, f"pt-bearer-{uuid.uuid4().hex[:8]}")
    robot, secret = next(iter(secured.robots.items()))
    try:
        yield UpstreamRegistry(secured.node, (robot, secret))
    finally:
        secured.node.stop()


# -- what clients see -------------------------------------------------------------------------------
MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json",
                   "application/vnd.docker.distribution.manifest.list.v2+json")


def manifest_get(node: NodeProcess, name: str, reference: str, *, timeout: float = 30) -> httpx.Response:
    return httpx.get(f"{node.url}/v2/{name}/manifests/{reference}", timeout=timeout,
                     headers={"Accept": ", ".join(MANIFEST_ACCEPT)})


def cache_state(response: httpx.Response) -> str | None:
    return response.headers.get(CACHE_HEADER)


def json_error_codes(response: httpx.Response) -> list[str]:
    """The spec error codes of a JSON error body; fails when the body is not one."""
    assert response.headers.get("content-type", "").startswith("application/json"), describe(response)
    return [error["code"] for error in response.json()["errors"]]


def pullthrough_counts(node: NodeProcess, repository: str, metric: str = "cargohold_pullthrough_requests_total",
                       by: str = "result") -> dict[str, float]:
    """A pull-through counter of `repository` on `node` (from its /metrics), by the label `by`."""
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and sample.labels.get("repository") == repository:
                key = sample.labels.get(by, "")
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def user_agents(upstream: UpstreamRegistry, path_contains: str, method: str | None = None) -> set[str]:
    """The User-Agents of the requests (of `method`) in a Distribution's access log whose path
    contains `path_contains`."""
    text = settled_log(upstream.url, upstream.process.log_path)
    line = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" \d{3} \d+ "[^"]*" "([^"]*)"')
    return {agent for verb, path, agent in line.findall(text)
            if path_contains in path and (method is None or verb == method)}
