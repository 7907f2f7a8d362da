"""A member's upstream down while skopeo pulls through the virtual repository whose first member is
that remote repository: killed (connections refused), the content already cached is still served,
the next member is still consulted and a name nobody has fails, each at once, on every node;
stalled (it accepts connections and never answers), one request waits out the upstream read
timeout, the cached content is served at once meanwhile, and afterwards that node assumes the
upstream offline so nothing waits on it again."""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass

import anyio
import pytest

from cargohold.upstream.client import Timeouts
from tests.pullthrough.conftest import UpstreamRegistry
from tests.support.oci import Image, build_image
from tests.support.skopeo import SkopeoError, docker_ref, inspect
from tests.virtual.conftest import pull_identical, served, skopeo_push

pytestmark = pytest.mark.anyio

if shutil.which("skopeo") is None:
    pytest.skip("skopeo not installed (Debian package skopeo)", allow_module_level=True)

AT_ONCE = 10.0                                  # seconds: an answer that did not wait on the upstream
ONE_TIMEOUT = Timeouts().read + AT_ONCE         # an answer that waited out one stalled upstream read


@dataclass
class DoomedMember:
    """`dev` = [hub (a remote repository of `upstream`), team-a (local)]: `cached` was pulled
    through hub before the fault, `local` is only in team-a."""
    upstream: UpstreamRegistry
    hub: str
    dev: str
    team_a: str
    cached: Image
    local: Image


async def doomed_member(cluster, upstreams, names, tmp_path) -> DoomedMember:
    suffix = uuid.uuid4().hex[:6]
    upstream = upstreams.distribution()
    cached, local = build_image(f"cached-{suffix}", layers=2, layer_size=100_000), build_image(f"local-{suffix}")
    upstream.seed(tmp_path, "library/cached", "v1", cached)
    hub = cluster.add_remote(names.hub, upstream.url, "--offline-period", "5m")
    dev = cluster.add_virtual(names.dev, [hub, names.team_a], "--deploy-to", names.team_a)
    skopeo_push(cluster.members[0], tmp_path, f"{names.team_a}/library/local", "v1", local)
    await pull_identical(cluster.members[0], f"{dev}/library/cached", "v1", cached, tmp_path)    # cached now
    return DoomedMember(upstream, hub, dev, names.team_a, cached, local)


async def test_a_killed_members_upstream_leaves_cached_content_and_the_next_members(
        e2e_cluster, e2e_upstreams, e2e_names, tmp_path):
    setup = await doomed_member(e2e_cluster, e2e_upstreams, e2e_names, tmp_path)
    first, second = e2e_cluster.members

    setup.upstream.kill()

    for node in (second, first):
        started = time.monotonic()
        await pull_identical(node, f"{setup.dev}/library/cached", "v1", setup.cached, tmp_path)
        await pull_identical(node, f"{setup.dev}/library/local", "v1", setup.local, tmp_path)
        with pytest.raises(SkopeoError):
            await inspect(docker_ref(node.host_port, f"{setup.dev}/library/nowhere", "v1"))
        assert time.monotonic() - started < 6 * AT_ONCE, node.url

        answers = {name: served(node, f"{setup.dev}/library/{name}", "v1") for name in ("cached", "local", "nowhere")}
        assert (answers["cached"].status, answers["cached"].member) == (200, f"{setup.hub}/library/cached")
        assert (answers["local"].status, answers["local"].member) == (200, f"{setup.team_a}/library/local")
        assert answers["nowhere"].status in (404, 503), answers["nowhere"]   # 503: a member failed
        assert all(answer.elapsed < AT_ONCE for answer in answers.values()), answers


async def test_a_stalled_members_upstream_costs_one_timeout_then_nothing_waits(
        e2e_cluster, e2e_upstreams, e2e_names, tmp_path):
    setup = await doomed_member(e2e_cluster, e2e_upstreams, e2e_names, tmp_path)
    first, second = e2e_cluster.members

    setup.upstream.stall()

    local = f"{setup.dev}/library/local"
    async with anyio.create_task_group() as tasks:
        waited = {}

        async def first_local_pull() -> None:      # asks the stalled upstream first, then team-a
            waited["answer"] = await anyio.to_thread.run_sync(served, second, local, "v1")
        tasks.start_soon(first_local_pull)
        # meanwhile the cached image is served without waiting on the upstream
        await pull_identical(first, f"{setup.dev}/library/cached", "v1", setup.cached, tmp_path)
        cached = await anyio.to_thread.run_sync(served, second, f"{setup.dev}/library/cached", "v1")
        assert cached.elapsed < AT_ONCE, cached
    answer = waited["answer"]
    assert (answer.status, answer.member) == (200, f"{setup.team_a}/library/local"), answer
    assert answer.elapsed < ONE_TIMEOUT, answer

    # the node that waited assumes the upstream offline now: nothing waits on it again (each node
    # learns it by itself: the other one would wait out one timeout of its own)
    started = time.monotonic()
    await pull_identical(second, local, "v1", setup.local, tmp_path)
    assert time.monotonic() - started < AT_ONCE
