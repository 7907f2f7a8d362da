"""Two sites of two nodes on one etcd: geo-replication, losing a site, rules, faults."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.cluster.conftest import client_for
from tests.support import oci
from tests.support.faultproxy import FaultProxy
from tests.support.node import free_port

pytestmark = pytest.mark.anyio


def two_sites(cluster, a_settings=None, b_settings=None, a_args=(), b_args=()):
    nodes = {}
    for name in ("a1", "a2"):
        nodes[name] = cluster.add(name, settings={"site": "A", **(a_settings or {})}, args=a_args)
    for name in ("b1", "b2"):
        nodes[name] = cluster.add(name, settings={"site": "B", **(b_settings or {})}, args=b_args)
    return nodes


def site_holds(cluster, digests, site_nodes) -> bool:
    holders = cluster.holders()
    return all(holders.get(d, set()) & set(site_nodes) for d in digests)


async def pull_image(node, repo, tag, image):
    async with client_for(node) as c:
        r = await c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": image.media_type})
        assert r.status_code == 200 and r.content == image.manifest, (node.node_id, oci.describe(r))
        for digest, data in image.all_blobs().items():
            r = await c.get(f"/v2/{repo}/blobs/{digest}")
            assert r.status_code == 200 and r.content == data, (node.node_id, digest, r.status_code)


async def test_push_twenty_images_at_a_pull_them_all_at_b(cluster):
    nodes = two_sites(cluster)
    images = {f"v{i}": oci.build_image(f"geo{i}", layers=2, layer_size=20_000) for i in range(20)}
    async with client_for(nodes["a1"]) as client:
        for tag, image in images.items():
            await oci.push_image(client, "geo/app", tag, image)
    for tag, image in images.items():          # at once: B streams from A what it lacks
        await pull_image(nodes["b1"], "geo/app", tag, image)
    everything = set().union(*(set(i.all_blobs()) | {i.digest} for i in images.values()))
    # Meanwhile, check the order B receives things in: a manifest only after all its blobs.
    manifests = {i.digest: set(i.blobs) for i in images.values()}
    b_nodes = {"b1", "b2"}

    def consistent_and_complete():
        holders = cluster.holders()
        for manifest, blobs in manifests.items():
            if holders.get(manifest, set()) & b_nodes:
                assert all(holders.get(b, set()) & b_nodes for b in blobs), "manifest before its blobs in B"
        return all(len(holders.get(d, set()) & b_nodes) == 2 for d in everything)
    cluster.wait_until(consistent_and_complete, what="site B to hold two copies of everything")
    status = json.loads(cluster.cli("replication", "status", "--json").stdout)
    pending_b = [r for r in status["rules"] if r["site"] == "B"]
    assert pending_b and all(r["pending"] == 0 for r in pending_b)


async def test_sync_sites_then_site_a_is_lost_and_comes_back(cluster):
    from cargohold.coordinator.etcd import EtcdClient

    # B receives slowly (about a second per image), so an acknowledgement that did not wait
    # for site B would be caught by the check right after it.
    nodes = two_sites(cluster, a_args=["--sync-sites", "1"], b_settings={"site_bandwidth": {"A": "100K"}})
    images = {f"s{i}": oci.build_image(f"sync{i}", layers=2, layer_size=40_000) for i in range(4)}
    prefix = f"/cargohold/{cluster.name}/blobs/"
    async with client_for(nodes["a1"]) as client, EtcdClient([cluster.etcd_url]) as etcd:
        for tag, image in images.items():
            await oci.push_image(client, "sync/app", tag, image)   # each 201 waited for site B
            kvs, _, _ = await etcd.get_prefix(f"{prefix}{image.digest}/at/", keys_only=True)
            holders = {kv.key.rpartition("/")[2] for kv in kvs}
            assert holders & {"b1", "b2"}, f"{tag} was acknowledged before site B held it ({holders})"
    for name in ("a1", "a2"):
        nodes[name].kill()                                           # right after the acknowledgements
    for tag, image in images.items():
        await pull_image(nodes["b1"], "sync/app", tag, image)
        await pull_image(nodes["b2"], "sync/app", tag, image)
    # Pushes to B go on while A is down.
    during = oci.build_image("during-outage", layers=1)
    async with client_for(nodes["b2"]) as client:
        await oci.push_image(client, "sync/app", "during", during)
    # A comes back and catches up without an operator.
    for name in ("a1", "a2"):
        nodes[name].start()
    wanted = set(during.all_blobs()) | {during.digest}
    cluster.wait_until(lambda: site_holds(cluster, wanted, {"a1", "a2"}), what="site A to catch up")
    await pull_image(nodes["a2"], "sync/app", "during", during)


async def test_replication_rules_keep_a_repository_in_its_site(cluster, tmp_path):
    rules = tmp_path / "replication.yaml"
    rules.write_text(yaml.safe_dump({"replication": [{"repositories": "only-a/*", "sites": ["A"]}]}))
    nodes = two_sites(cluster)
    assert cluster.cli("replication", "rules", "set", str(rules)).returncode == 0
    assert "only-a/* -> A" in cluster.cli("replication", "rules", "list").stdout
    local, everywhere = oci.build_image("local", layers=1), oci.build_image("everywhere", layers=1)
    async with client_for(nodes["a1"]) as client:
        await oci.push_image(client, "only-a/app", "v1", local)
        await oci.push_image(client, "shared/app", "v1", everywhere)
    wanted = set(everywhere.all_blobs()) | {everywhere.digest}
    cluster.wait_until(lambda: site_holds(cluster, wanted, {"b1", "b2"}), what="shared/app in B")
    holders = cluster.holders()
    for digest in set(local.all_blobs()) | {local.digest}:
        assert not holders[digest] & {"b1", "b2"}, "a site outside the rule received a copy"
    await pull_image(nodes["b1"], "only-a/app", "v1", local)   # still pullable there, from site A
    status = json.loads(cluster.cli("replication", "status", "--json").stdout)
    assert not [r for r in status["rules"] if r["site"] == "B" and r["rule"].startswith("only-a")]


async def test_a_link_between_sites_drops_mid_transfer(cluster):
    grpc_port = free_port()
    proxy = FaultProxy(grpc_port, cut_after=3 * 1024 * 1024, cut_connections=2)
    try:
        a1 = cluster.add("a1", settings={"site": "A", "replicas_per_site": 1}, start=False,
                         args=["--grpc-advertise", proxy.address])
        a1.grpc_port = grpc_port
        a1.start()
        data = os.urandom(10 * 1024 * 1024)
        async with client_for(a1) as client:
            digest = await oci.push_blob(client, "wan/app", data)
        b1 = cluster.add("b1", settings={"site": "B", "replicas_per_site": 1})
        cluster.wait_until(lambda: "b1" in cluster.holders().get(digest, set()), what="B's copy")
        assert proxy.cuts_made >= 1
        assert "resuming" in b1.log_path.read_text()
        async with client_for(b1) as client:
            r = await client.get(f"/v2/wan/app/blobs/{digest}")
            assert r.status_code == 200 and r.content == data
    finally:
        proxy.close()


async def test_a_full_target_is_retried_with_backoff_and_never_marked_done(cluster):
    a1 = cluster.add("a1", settings={"site": "A", "replicas_per_site": 1})
    b1 = cluster.add("b1", settings={"site": "B", "replicas_per_site": 1, "storage_limit": "100K"})
    data = os.urandom(300_000)
    async with client_for(a1) as client:
        digest = await oci.push_blob(client, "full/app", data)

    def failing_with_reason():
        status = json.loads(cluster.cli("replication", "status", "--json").stdout)
        site_b = next(s for s in status["sites"] if s["site"] == "B")
        failures = [f for f in site_b["failures"] if f["digest"] == digest]
        return failures and failures[0]["attempts"] >= 2 and failures[0]
    failure = cluster.wait_until(failing_with_reason, what="B to report the refused copy")
    assert "storage limit" in failure["reason"]
    assert "b1" not in cluster.holders()[digest]
    status = json.loads(cluster.cli("replication", "status", "--json").stdout)
    assert any(r["site"] == "B" and r["pending"] >= 1 and r["lag_seconds"] > 0 for r in status["rules"])
    # Given room, the retry succeeds without an operator touching the item.
    b1.stop()
    config = b1.data_dir / "config.json.yaml"
    config.write_text(json.dumps({"site": "B", "replicas_per_site": 1, "storage_limit": "10M"}))
    b1.start()
    cluster.wait_until(lambda: "b1" in cluster.holders().get(digest, set()), what="B's copy after room")


async def test_grpc_between_nodes_over_mutual_tls(cluster, tmp_path):
    from tests.support.tls import make_ca_and_certs
    from cargohold.replication.transfer import PeerClient, PeerUnavailable

    files = make_ca_and_certs(tmp_path, ["node"])
    tls_args = ["--grpc-tls-cert", str(files["node"][0]), "--grpc-tls-key", str(files["node"][1]),
                "--grpc-tls-ca", str(files["ca"])]
    a = cluster.add("a", args=tls_args)
    cluster.add("b", args=tls_args)
    data = os.urandom(2_000_000)
    async with client_for(a) as client:
        digest = await oci.push_blob(client, "tls/app", data)
    cluster.wait_until(lambda: cluster.holders().get(digest) == {"a", "b"}, what="b's copy over TLS")
    plain = PeerClient()                  # a peer without a client certificate is refused
    try:
        with pytest.raises(PeerUnavailable):
            await plain.stat(f"127.0.0.1:{a.grpc_port}", digest, timeout=3)
    finally:
        plain.close()


async def test_bandwidth_limit_between_sites(cluster):
    import time

    a1 = cluster.add("a1", settings={"site": "A", "replicas_per_site": 1})
    data = os.urandom(3 * 1024 * 1024)
    async with client_for(a1) as client:
        digest = await oci.push_blob(client, "bw/app", data)
    started = time.monotonic()
    cluster.add("b1", settings={"site": "B", "replicas_per_site": 1, "site_bandwidth": {"A": "1M"}})
    cluster.wait_until(lambda: "b1" in cluster.holders().get(digest, set()), what="B's copy")
    # 3 MiB at 1 MiB/s with a one-second burst: at least about two seconds.
    assert time.monotonic() - started >= 1.8
