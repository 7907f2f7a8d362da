"""API version check (`GET /v2/`) and routing."""

import pytest

from tests.support.oci import describe

pytestmark = pytest.mark.anyio


async def test_v2_base_answers_200_with_api_version_header(client):
    r = await client.get("/v2/")
    assert r.status_code == 200, describe(r)
    # spec: the "Docker-Distribution-API-Version" header SHOULD be set to "registry/2.0"
    assert r.headers.get("Docker-Distribution-API-Version") == "registry/2.0", describe(r)


async def test_v2_base_without_trailing_slash(client):
    r = await client.get("/v2")
    # Either served directly or redirected to /v2/ -- never an error.
    assert r.status_code in (200, 301, 307, 308), describe(r)
    if r.status_code != 200:
        assert r.headers["Location"].endswith("/v2/")


async def test_head_v2_base(client):
    r = await client.head("/v2/")
    assert r.status_code == 200, describe(r)
    assert r.content == b""


@pytest.mark.parametrize("path", [
    "/v1/",
    "/v3/",
    "/nothing-here",
    "/v2/some/repo/unknown-endpoint/x",
    "/v2/some/repo/blobs",
])
async def test_unknown_routes_are_404(client, path):
    r = await client.get(path)
    assert r.status_code == 404, describe(r)
