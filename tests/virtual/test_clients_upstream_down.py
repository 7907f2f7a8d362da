"""A member's upstream down (killed: connections refused) while skopeo pulls through the virtual
repository whose first member is that remote repository: the content already cached is still
served, the next member is still consulted, a name nobody has fails quickly, on every node."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest

from tests.support.oci import build_image
from tests.support.skopeo import SkopeoError, inspect, docker_ref
from tests.virtual.conftest import pull_identical, served, skopeo_push

pytestmark = pytest.mark.anyio

if shutil.which("skopeo") is None:
    pytest.skip("skopeo not installed (Debian package skopeo)", allow_module_level=True)

ANSWER_WITHIN = 10.0     # seconds for any one answer with the upstream down: nothing waits on it


async def test_a_members_upstream_down_leaves_cached_content_and_the_next_members(
        e2e_cluster, e2e_upstreams, e2e_names, tmp_path):
    names, suffix = e2e_names, uuid.uuid4().hex[:6]
    doomed = e2e_upstreams.distribution()
    cached, local = build_image(f"cached-{suffix}", layers=2, layer_size=100_000), build_image(f"local-{suffix}")
    doomed.seed(tmp_path, "library/cached", "v1", cached)
    hub = e2e_cluster.add_remote(names.hub, doomed.url)
    dev = e2e_cluster.add_virtual(names.dev, [hub, names.team_a], "--deploy-to", names.team_a)
    first, second = e2e_cluster.members
    skopeo_push(first, tmp_path, f"{names.team_a}/library/local", "v1", local)
    await pull_identical(first, f"{dev}/library/cached", "v1", cached, tmp_path)     # now in the cache

    doomed.kill()

    for node in (second, first):
        started = time.monotonic()
        await pull_identical(node, f"{dev}/library/cached", "v1", cached, tmp_path)
        await pull_identical(node, f"{dev}/library/local", "v1", local, tmp_path)
        with pytest.raises(SkopeoError):
            await inspect(docker_ref(node.host_port, f"{dev}/library/nowhere", "v1"))
        assert time.monotonic() - started < 6 * ANSWER_WITHIN, node.url

        answers = {name: served(node, f"{dev}/library/{name}", "v1") for name in ("cached", "local", "nowhere")}
        assert (answers["cached"].status, answers["cached"].member) == (200, f"{hub}/library/cached")
        assert (answers["local"].status, answers["local"].member) == (200, f"{names.team_a}/library/local")
        assert answers["nowhere"].status in (404, 503), answers["nowhere"]   # 503: a member failed
        assert all(answer.elapsed < ANSWER_WITHIN for answer in answers.values()), answers
