"""Access rules apply to remote repositories like to any other name: a routed request passes
the rules under its own name and under the cache's canonical name, and a mirror (`?ns=`)
request is judged by the canonical name."""

from __future__ import annotations

import httpx
import pytest

from cargohold.repositories.definitions import RemoteRepository
from tests.auth.conftest import TokenAuth, provision
from tests.pullthrough.conftest import REPO, define, running_node
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

RULES = {"rules": [
    {"subjects": ["anonymous"], "repositories": ["dh/*", "team/**", "open/team/**"], "actions": ["pull"]},
]}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, etcd, cluster_name):
    provision(etcd.url, cluster_name, users={}, robots=(), rules=RULES)
    with running_node(tmp_path_factory.mktemp("guarded"), etcd, cluster_name, "--auth", "on") as node:
        yield node


@pytest.fixture
async def anonymous(guarded):
    async with httpx.AsyncClient(base_url=guarded.url, auth=TokenAuth(None, None), timeout=30) as c:
        yield c


async def test_cache_short_form_cannot_dodge_canonical_rules(etcd, cluster_name, anonymous):
    hub = RemoteRepository(name="dh", url="https://registry-1.docker.io")
    await define(etcd, cluster_name, hub)

    async def routed() -> bool:     # before the node follows the definition, `dh/alpine` is local (404)
        response = await anonymous.get("/v2/dh/alpine/manifests/3")
        return response.status_code == 401
    await eventually(routed, what="dh routed")
    # `dh/alpine` passes the rules by its own name, but it is `dh/library/alpine`: refused
    # before any upstream request (this machine cannot reach Docker Hub: a request would 503)
    response = await anonymous.get("/v2/dh/alpine/manifests/3")
    assert response.status_code == 401


async def test_cache_mirror_request_judged_by_canonical_name(etcd, cluster_name, anonymous, upstream):
    await define(etcd, cluster_name, RemoteRepository(name="open", url=upstream.url, mirror_for=("open.example",)))
    await define(etcd, cluster_name, RemoteRepository(name="closed", url=upstream.url,
                                                      mirror_for=("closed.example",)))

    async def served() -> bool:
        response = await anonymous.get(f"/v2/{REPO}/manifests/v1", params={"ns": "open.example"})
        return response.status_code == 200 and response.content == upstream.image.manifest
    await eventually(served, what="a mirror request allowed on open/team/app")
    before = upstream.count(f"/v2/{REPO}/manifests/")
    # `team/app` is open to anonymous, but the request is `closed/team/app`'s
    refused = await anonymous.get(f"/v2/{REPO}/manifests/v1", params={"ns": "closed.example"})
    assert refused.status_code == 401
    assert upstream.count(f"/v2/{REPO}/manifests/") == before
