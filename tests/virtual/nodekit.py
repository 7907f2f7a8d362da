"""Shared by the `test_node_*` modules: virtual repositories defined in etcd while real nodes
run (as `cargohold repo add --virtual` does), over local namespaces and remote repositories of
a real upstream (Debian's `docker-registry`, see tests/pullthrough/conftest.py)."""

from __future__ import annotations

import httpx

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.repositories.virtual import Member, VirtualRepository
from tests.support.oci import describe
from tests.support.poll import eventually

MEMBER = "x-cargohold-member"


async def define_virtual(etcd, cluster: str, name: str, members: list[str], *, deploy_to: str | None = None,
                         include: dict[str, tuple[str, ...]] | None = None,
                         exclude: dict[str, tuple[str, ...]] | None = None, replace: bool = False) -> VirtualRepository:
    include, exclude = include or {}, exclude or {}
    definition = VirtualRepository(name, tuple(Member(m, tuple(include.get(m, ())), tuple(exclude.get(m, ())))
                                               for m in members), deploy_to)
    async with EtcdClient([etcd.url]) as etcd_client:
        await ClusterMetadata(etcd_client, cluster, "test").define_virtual(definition, replace=replace)
    return definition


async def wait_virtual(client: httpx.AsyncClient, name: str) -> None:
    """Until the node follows the virtual repository `name` (its own name answers that it is one)."""
    async def followed() -> bool:
        response = await client.get(f"/v2/{name}/tags/list")
        return response.status_code == 404 and "virtual repository" in response.text
    await eventually(followed, what=f"{name} followed as a virtual repository")


async def virtual(etcd, cluster: str, clients: list[httpx.AsyncClient], name: str, members: list[str],
                  **settings) -> VirtualRepository:
    definition = await define_virtual(etcd, cluster, name, members, **settings)
    for client in clients:
        await wait_virtual(client, name)
    return definition


async def get_ok(client: httpx.AsyncClient, path: str, **kwargs) -> httpx.Response:
    response = await client.get(path, **kwargs)
    assert response.status_code == 200, describe(response)
    return response


MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json"])


async def manifest(client: httpx.AsyncClient, name: str, reference: str) -> httpx.Response:
    return await client.get(f"/v2/{name}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES})
