"""Issue 13: what one node acknowledged, every node serves at once, on every read path.

500 iterations on a 3-node cluster, once per server runtime: push a small image (1-3 tiny
layers, every third one followed by an artifact that refers to it, every fourth one moving a
`latest` tag to a new digest) through a random node, and
the moment the manifest PUT answers 201, read every part of it through both other nodes at
once: the manifest by tag and by digest (GET and HEAD), every blob (GET and HEAD), the tags list
and, for the artifact, the referrers list of its subject. Zero wrong answers are allowed; a few
pushers run side by side so that the other nodes' read models really lag behind. A moved tag
answered with the digest it had before this push is a wrong answer too (the read barrier of
`coordinator/barrier.py` makes every read by tag wait until its node has seen what etcd had).
"""

from __future__ import annotations

import random
import time
import uuid

import anyio
import httpx
import pytest

from tests.support import oci
from tests.support.node import NodeProcess, all_running
from tests.support.readback import STALE_TAG, PushedImage, push, read_every_part

pytestmark = pytest.mark.anyio

ITERATIONS = 500
PUSHERS = 4
NODES = ("a", "b", "c")
REPOS = ("ryw/one", "ryw/two", "ryw/three")
SEED = 13


@pytest.fixture(params=["asyncio", "trio"])
def three_nodes(request, etcd, tmp_path):
    """Three nodes of one fresh cluster on the session's etcd, serving with the given runtime."""
    cluster = f"ryw-{request.param}-{uuid.uuid4().hex[:6]}"
    with all_running([NodeProcess(tmp_path / n, etcd_url=etcd.url, cluster=cluster, node_id=n, runtime=request.param)
                      for n in NODES]) as nodes:
        yield nodes


def image_for(iteration: int, pusher: int, rng: random.Random) -> PushedImage:
    """A new image under a new tag; every fourth one moves its pusher's own `latest` tag instead
    (only that pusher pushes it, so the tag's expected digest is known)."""
    image = oci.build_image(f"ryw-{SEED}-{iteration}", layers=rng.randint(1, 3), layer_size=128)
    if iteration % 4 == 1:
        return PushedImage(REPOS[pusher % len(REPOS)], f"p{pusher}-latest", image)
    return PushedImage(rng.choice(REPOS), f"i{iteration}", image)


def referrer_of(subject: PushedImage) -> PushedImage:
    artifact = oci.build_artifact(f"sig-{subject.tag}", subject=subject.image)
    return PushedImage(subject.repo, f"{subject.tag}-sig", artifact, subject=subject.digest)


async def test_every_read_path_serves_what_another_node_acknowledged(three_nodes):
    rng = random.Random(SEED)
    failures: list[str] = []
    clients = [httpx.AsyncClient(base_url=n.url, timeout=30) for n in three_nodes]
    iterations = iter(range(ITERATIONS))

    async def push_then_read_elsewhere(pushed: PushedImage) -> None:
        writer = rng.randrange(len(clients))
        await push(clients[writer], pushed)
        async with anyio.create_task_group() as tg:
            for reader, client in enumerate(clients):
                if reader != writer:
                    tg.start_soon(read_through, client, pushed, f"{NODES[writer]}->{NODES[reader]}")

    async def read_through(client: httpx.AsyncClient, pushed: PushedImage, route: str) -> None:
        failures.extend(f"{pushed.repo}:{pushed.tag} {route} {p}" for p in await read_every_part(client, pushed))

    async def pusher(number: int) -> None:
        for iteration in iterations:        # shared: each iteration is taken by one pusher
            image = image_for(iteration, number, rng)
            await push_then_read_elsewhere(image)
            if iteration % 3 == 0:
                await push_then_read_elsewhere(referrer_of(image))

    started = time.monotonic()
    try:
        async with anyio.create_task_group() as tg:
            for number in range(PUSHERS):
                tg.start_soon(pusher, number)
    finally:
        for client in clients:
            await client.aclose()
    stale = [f for f in failures if STALE_TAG in f]
    print(f"{ITERATIONS} iterations on {three_nodes[0].runtime}: {time.monotonic() - started:.1f}s, "
          f"{len(failures)} wrong answers, of which {len(stale)} a moved tag answered with its previous digest")
    assert failures == [], f"{len(failures)} wrong answers, first ones:\n" + "\n".join(failures[:20])
