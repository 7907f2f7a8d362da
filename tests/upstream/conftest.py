"""Real upstream registries for the upstream client: CNCF Distribution plain and with htpasswd
Basic auth, and a cargohold node with access control on (the Docker token flow), each with test
images pushed into it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import anyio
import httpx
import pytest

from tests.auth.conftest import Secured, start_secured
from tests.support.accesslog import settled_log
from tests.support.distribution import DistributionProcess
from tests.support.oci import Image, build_image, build_index, push_image

BASIC_USERS = {"puller": "puller-pass-7f3a"}
TAGS = ["v1", "v2", "v3", "v4", "v5"]


@dataclass
class Upstream:
    """A registry with `image` pushed as `repo:v1` (and more tags), `index` as `repo:multi`."""
    process: object
    repo: str
    image: Image
    index: Image

    @property
    def url(self) -> str:
        return self.process.url


def _push_test_images(client_factory, repo: str, seed: str) -> tuple[Image, Image]:
    image = build_image(f"{seed}-image", layer_size=200_000)
    index = build_index(f"{seed}-index")

    async def push():
        async with client_factory() as client:
            for tag in TAGS:
                await push_image(client, repo, tag, image)
            await push_image(client, repo, "multi", index)

    anyio.run(push, backend="trio")
    return image, index


@pytest.fixture(scope="module")
def distribution(tmp_path_factory):
    registry = DistributionProcess(tmp_path_factory.mktemp("distribution")).start()
    try:
        image, index = _push_test_images(lambda: httpx.AsyncClient(base_url=registry.url, timeout=30), "team/app",
                                          "plain")
        yield Upstream(registry, "team/app", image, index)
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def basic_distribution(tmp_path_factory):
    registry = DistributionProcess(tmp_path_factory.mktemp("distribution-basic"), users=BASIC_USERS).start()
    try:
        auth = next(iter(BASIC_USERS.items()))
        image, index = _push_test_images(
            lambda: httpx.AsyncClient(base_url=registry.url, auth=auth, timeout=30), "team/app", "basic")
        yield Upstream(registry, "team/app", image, index)
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def bearer_cargohold(tmp_path_factory, etcd, cluster_name) -> Upstream:
    """A cargohold node with `--auth on` and the test images in `team/app`, which alice may pull
    (through the token flow) and anonymous may not; anonymous may pull `public/app` (no token needed)."""
    secured: Secured = start_secured(tmp_path_factory, etcd, cluster_name)
    try:
        image, index = _push_test_images(lambda: secured.client("robot$ci"), "team/app", "bearer")
        _push_test_images(lambda: secured.client("robot$ci"), "public/app", "bearer-public")
        yield Upstream(secured.node, "team/app", image, index)
    finally:
        secured.node.stop()


def token_requests(node) -> int:
    """Token requests in a cargohold node's own access log."""
    return len(re.findall(r"GET /token \d{3}", settled_log(node.url, node.log_path)))


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    """The client runs inside nodes on both event loops (uvicorn: asyncio, hypercorn: trio)."""
    return request.param
