"""A real upstream (CNCF Distribution, Debian's `docker-registry`) with test images, a cargohold
node on the shared etcd, and remote repositories defined in etcd while the node runs (as
`cargohold repo add` does): each test defines its own, so caches never overlap."""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import anyio
import httpx
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.repositories.definitions import RemoteRepository
from tests.support.distribution import DistributionProcess
from tests.support.node import NodeProcess
from tests.support.oci import Image, build_image, build_index, push_image
from tests.support.poll import eventually

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
