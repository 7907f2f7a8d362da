"""etcd outages and partitions (issue 13): pulls go on, pushes fail fast, staleness is reported.

What a node does while etcd does not answer it (README, "etcd outages and partitions"):
* pulls are served from the read model and the local disk (or a peer): by digest always,
  by tag as this node last knew it, marked `X-Cargohold-Stale: <seconds>`; a read the model
  cannot answer (an unknown tag) is 503 with Retry-After, never a possibly false 404;
* pushes fail at once with 503 `UNAVAILABLE` and Retry-After;
* /readyz stays 200 (reads work) and says `"etcd": "unreachable"`; `/readyz?writable` is 503;
* when etcd comes back with its data, the watch resumes where it stopped: no reload.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from tests.support.node import NodeProcess
from tests.support.oci import ACCEPT_ALL, Image, build_image, describe, push_image
from tests.support.faultproxy import FaultProxy
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

# A grace this short makes every hold "cold" (older than half of it) a second after the push,
# so every pull during the outage wants to refresh one: the case that used to hang.
SETTINGS = {"gc_grace": "2s"}
OUTAGE = 30.0
# Generous bounds, not targets: a pull answered from memory and disk takes milliseconds; what
# matters is that none waits for etcd (which used to mean 10 s, or until etcd came back).
PULL_BOUND = 5.0
# This bound IS the behaviour: a push during an outage is refused within a few seconds
# (requests fail fast 2 s after etcd stopped answering), not after the 10 s retry budget.
PUSH_REFUSED_WITHIN = 3.0


def start_node(tmp_path, etcd_url: str, cluster: str, node_id: str) -> NodeProcess:
    data_dir = tmp_path / node_id
    data_dir.mkdir()
    config = data_dir / "config.json.yaml"
    config.write_text(json.dumps(SETTINGS))   # JSON is YAML
    return NodeProcess(data_dir, etcd_url=etcd_url, cluster=cluster, node_id=node_id,
                       extra_args=["--config", str(config)]).start()


@pytest.fixture
def nodes(local_etcd, tmp_path):
    cluster = f"t-outage-{uuid.uuid4().hex[:6]}"
    started: list[NodeProcess] = []
    try:
        for node_id in ("a", "b", "c"):
            started.append(start_node(tmp_path, local_etcd.url, cluster, node_id))
        yield started
    finally:
        for node in started:
            node.kill()


def client_for(node: NodeProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.url, timeout=60)


# -- pulls ------------------------------------------------------------------------------------------
@dataclass
class Pulls:
    """Every pull made, by phase: (seconds, status, stale header)."""
    phase: str = "before"
    made: dict[str, list[tuple[float, int, str | None]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def record(self, r: httpx.Response, seconds: float) -> None:
        self.made.setdefault(self.phase, []).append((seconds, r.status_code, r.headers.get("X-Cargohold-Stale")))
        if r.status_code != 200:
            self.failures.append(f"{self.phase}: {describe(r)}")

    def latencies(self, phase: str) -> list[float]:
        return [seconds for seconds, _, _ in self.made.get(phase, [])]

    def summary(self) -> str:
        lines = []
        for phase, rows in self.made.items():
            times = sorted(seconds for seconds, _, _ in rows)
            lines.append(f"{phase}: {len(rows)} pulls, p50 {statistics.median(times) * 1000:.1f} ms, "
                         f"p99 {times[int(len(times) * 0.99)] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms")
        return "\n".join(lines)


def pull_requests(repo: str, tag: str, image: Image) -> list[tuple[str, str]]:
    """What a pull does: the manifest by tag and by digest (HEAD, GET), every blob (HEAD, GET)."""
    wanted = [("HEAD", f"/v2/{repo}/manifests/{tag}"), ("GET", f"/v2/{repo}/manifests/{tag}"),
              ("GET", f"/v2/{repo}/manifests/{image.digest}")]
    for d in image.blobs:
        wanted += [("HEAD", f"/v2/{repo}/blobs/{d}"), ("GET", f"/v2/{repo}/blobs/{d}")]
    return wanted


async def keep_pulling(client: httpx.AsyncClient, requests: list[tuple[str, str]], pulls: Pulls,
                       stop: anyio.Event) -> None:
    while not stop.is_set():
        for method, path in requests:
            started = time.perf_counter()
            r = await client.request(method, path, headers={"Accept": ACCEPT_ALL})
            pulls.record(r, time.perf_counter() - started)


# -- pushes -----------------------------------------------------------------------------------------
async def refused_push(client: httpx.AsyncClient, repo: str, image: Image) -> float:
    """Push while etcd is away: the first request that needs etcd is refused with 503 and
    Retry-After; returns how long the refusal took."""
    started = time.perf_counter()
    for d, data in image.blobs.items():
        r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data)
        if r.status_code != 201:
            break
    else:
        r = await client.put(f"/v2/{repo}/manifests/late", content=image.manifest,
                             headers={"Content-Type": image.media_type})
    elapsed = time.perf_counter() - started
    assert r.status_code == 503, describe(r)
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE" and int(r.headers["Retry-After"]) > 0, describe(r)
    return elapsed


async def metric(client: httpx.AsyncClient, name: str) -> float:
    r = await client.get("/metrics")
    for line in r.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def readiness(client: httpx.AsyncClient, query: str = "") -> tuple[int, dict]:
    r = await client.get("/readyz" + query)
    return r.status_code, r.json()


# -- etcd stopped under continuous pulls on every node ---------------------------------------------
async def test_pulls_go_on_and_pushes_fail_fast_while_etcd_is_down(nodes, local_etcd):
    repo = "outage/app"
    images = {f"v{i}": build_image(f"outage-{i}", layers=2) for i in range(2)}
    clients = [client_for(node) for node in nodes]
    try:
        for tag, image in images.items():
            await push_image(clients[0], repo, tag, image)
        requests = [req for tag, image in images.items() for req in pull_requests(repo, tag, image)]
        for client in clients:     # every node knows every tag (its read model has them)
            await eventually(lambda: all_found(client, requests), what="every node serves the images")
        await anyio.sleep(1.2)     # every hold is now older than half the grace: cold

        pulls, pushes = Pulls(), []
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(keep_pulling, client, requests, pulls, stop)
            await anyio.sleep(3)
            pulls.phase = "outage"
            await anyio.to_thread.run_sync(local_etcd.stop)
            outage_ends = time.monotonic() + OUTAGE
            while time.monotonic() < outage_ends:
                for i, client in enumerate(clients):
                    pushes.append(await refused_push(client, repo, build_image(f"refused-{i}-{len(pushes)}")))
                await anyio.sleep(2)
            stale_ready = [await readiness(c) for c in clients]
            writable = [await readiness(c, "?writable") for c in clients]
            staleness = [await metric(c, "cargohold_read_model_staleness_seconds") for c in clients]
            await anyio.to_thread.run_sync(local_etcd.start)
            pulls.phase = "after"
            await anyio.sleep(3)
            stop.set()

        print(pulls.summary())
        print(f"refused pushes: {len(pushes)}, max {max(pushes) * 1000:.0f} ms")
        assert pulls.failures == [], pulls.failures[:5]
        for phase in ("before", "outage", "after"):
            assert pulls.latencies(phase) and max(pulls.latencies(phase)) < PULL_BOUND, pulls.summary()
        outage_stale = [stale for _, _, stale in pulls.made["outage"] if stale is not None]
        assert outage_stale and max(int(s) for s in outage_stale) >= OUTAGE - 5, "reads were not marked stale"
        assert max(pushes) < PUSH_REFUSED_WITHIN, pushes
        assert all(status == 200 and body["etcd"] == "unreachable" for status, body in stale_ready), stale_ready
        assert all(status == 503 for status, _ in writable), writable
        assert min(staleness) >= OUTAGE - 5, staleness

        # etcd is back with its data: pushes work again, every node's watch resumed (no reload)
        late = build_image("after-the-outage")
        await eventually(lambda: pushed(clients[1], repo, "late", late), interval=0.2, what="a push after the outage")
        for client in clients:
            await eventually(lambda: manifest_is(client, repo, "late", late), what="every node sees the new tag")
            assert await metric(client, "cargohold_read_model_loads_total") == 1
            assert await metric(client, "cargohold_read_model_staleness_seconds") == 0
            r = await client.get(f"/v2/{repo}/manifests/v0", headers={"Accept": ACCEPT_ALL})
            assert r.status_code == 200 and "X-Cargohold-Stale" not in r.headers, describe(r)
            assert (await readiness(client, "?writable"))[0] == 200
        # the cold holds were refreshed once etcd took writes again
        assert max([await metric(c, "cargohold_hold_refreshes_total") for c in clients]) > 0
    finally:
        for client in clients:
            await client.aclose()


async def all_found(client: httpx.AsyncClient, requests: list[tuple[str, str]]) -> bool:
    for method, path in requests:
        r = await client.request(method, path, headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200, describe(r)
    return True


async def pushed(client: httpx.AsyncClient, repo: str, tag: str, image: Image) -> bool:
    await push_image(client, repo, tag, image)
    return True


async def manifest_is(client: httpx.AsyncClient, repo: str, reference: str, image: Image) -> bool:
    r = await client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_ALL})
    assert r.status_code == 200 and r.content == image.manifest, describe(r)
    return True


# -- one node cut off from etcd, still reachable by clients ----------------------------------------
@pytest.fixture
def partitioned(local_etcd, tmp_path):
    """Nodes a and b use etcd directly; node c through a proxy the test can partition."""
    cluster = f"t-partition-{uuid.uuid4().hex[:6]}"
    proxy = FaultProxy(local_etcd.client_port, cut_after=0, cut_connections=0)
    started: list[NodeProcess] = []
    try:
        for node_id in ("a", "b"):
            started.append(start_node(tmp_path, local_etcd.url, cluster, node_id))
        started.append(start_node(tmp_path, f"http://{proxy.address}", cluster, "c"))
        yield started, proxy
    finally:
        for node in started:
            node.kill()
        proxy.close()


async def test_a_partitioned_node_serves_what_it_knows_and_says_how_stale(partitioned):
    (a, b, c), proxy = partitioned
    repo = "partition/app"
    old, new = build_image("partition-old", layers=2), build_image("partition-new", layers=1)
    async with client_for(a) as ca, client_for(b) as cb, client_for(c) as cc:
        await push_image(ca, repo, "v1", old)
        await eventually(lambda: manifest_is(cc, repo, "v1", old), what="c sees v1")

        proxy.partition()
        await eventually(lambda: staleness_reported(cc), what="c to notice it is cut off")
        # the cluster moves on: v1 now names the new image, and v2 is new
        await push_image(ca, repo, "v1", new)
        await push_image(ca, repo, "v2", new)
        await eventually(lambda: manifest_is(cb, repo, "v1", new), what="b sees the new v1")

        # c serves content by digest, always right, marked stale
        for path in [f"/v2/{repo}/manifests/{old.digest}", *(f"/v2/{repo}/blobs/{d}" for d in old.blobs)]:
            for method in ("HEAD", "GET"):
                r = await cc.request(method, path, headers={"Accept": ACCEPT_ALL})
                assert r.status_code == 200 and "X-Cargohold-Stale" in r.headers, describe(r)
        # ... a tag as it last knew it, marked stale
        r = await cc.get(f"/v2/{repo}/manifests/v1", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200 and r.content == old.manifest, describe(r)
        assert int(r.headers["X-Cargohold-Stale"]) >= 0, describe(r)
        # ... and for what it cannot know (a tag it has never seen), 503 and not a false 404, fast
        started = time.perf_counter()
        r = await cc.get(f"/v2/{repo}/manifests/v2", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 503 and "Retry-After" in r.headers, describe(r)
        assert time.perf_counter() - started < PUSH_REFUSED_WITHIN
        # pushes through c are refused fast; through a they work
        assert await refused_push(cc, repo, build_image("partition-refused")) < PUSH_REFUSED_WITHIN
        assert (await readiness(cc))[0] == 200 and (await readiness(cc, "?writable"))[0] == 503
        # the rest of the cluster is unaffected
        for client in (ca, cb):
            r = await client.get(f"/v2/{repo}/manifests/v2", headers={"Accept": ACCEPT_ALL})
            assert r.status_code == 200 and "X-Cargohold-Stale" not in r.headers, describe(r)
            assert (await readiness(client, "?writable"))[0] == 200
        await push_image(cb, repo, "v3", old)

        proxy.heal()
        # c catches up from its watch, without reloading, and stops marking its answers
        await eventually(lambda: manifest_is(cc, repo, "v1", new), what="c sees the new v1 after the partition")
        await eventually(lambda: manifest_is(cc, repo, "v3", old), what="c sees v3 after the partition")
        r = await cc.get(f"/v2/{repo}/manifests/v2", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200 and "X-Cargohold-Stale" not in r.headers, describe(r)
        assert await metric(cc, "cargohold_read_model_loads_total") == 1
        await eventually(lambda: pushed(cc, repo, "v4", new), interval=0.2, what="a push through c after the partition")


async def staleness_reported(client: httpx.AsyncClient) -> bool:
    status, body = await readiness(client)
    assert status == 200 and body["etcd"] == "unreachable", body
    return True
