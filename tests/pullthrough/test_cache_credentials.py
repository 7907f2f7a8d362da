"""An upstream with htpasswd Basic auth: pulls go through with the stored credentials, which no
log line, endpoint or status record ever shows. Every upstream call is an audit event."""

from __future__ import annotations

import json

import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from tests.pullthrough.conftest import REPO, remote, running_upstream
from tests.support.oci import error_codes
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-upstream-pw-91c2"
USERS = {"puller": PASSWORD}


@pytest.fixture(scope="module")
def basic_upstream(tmp_path_factory):
    with running_upstream(tmp_path_factory.mktemp("basic-upstream"), users=USERS) as registry:
        yield registry


async def _status_of(etcd, cluster: str, node_id: str) -> dict:
    async with EtcdClient([etcd.url]) as etcd_client:
        metadata = ClusterMetadata(etcd_client, cluster, "test")
        await metadata.load()
        return dict(metadata.node_status().get(node_id, {}))


async def test_cache_basic_auth_upstream_and_credentials_never_shown(etcd, cluster_name, client, node,
                                                                     basic_upstream):
    hub = await remote(etcd, cluster_name, client, basic_upstream.url, ttl=3600, username="puller",
                       password=PASSWORD)
    name = f"{hub.name}/{REPO}"
    pulled = await client.get(f"/v2/{name}/manifests/v1")
    assert pulled.status_code == 200, pulled.text
    assert pulled.content == basic_upstream.image.manifest
    listed = await client.get(f"/v2/{name}/tags/list")
    assert listed.status_code == 200 and "v1" in listed.json()["tags"]

    wrong = await remote(etcd, cluster_name, client, basic_upstream.url, username="puller", password="wrong-pw")
    refused = await client.get(f"/v2/{wrong.name}/{REPO}/manifests/v1")
    assert refused.status_code == 502 and error_codes(refused) == ["UNAVAILABLE"]

    async def published() -> dict:
        status = await _status_of(etcd, cluster_name, node.node_id)
        return status.get("pullthrough", {}).get(hub.name)
    figures = await eventually(published, what="the pullthrough section of the node's status")
    assert figures["misses"] == 1 and figures["upstream_requests"] >= 2 and figures["bytes_from_upstream"] > 0

    shown = [node.log_path.read_text(), (node.data_dir / "audit.log").read_text(), refused.text,
             (await client.get("/metrics")).text, (await client.get("/v2/_catalog")).text,
             json.dumps(await _status_of(etcd, cluster_name, node.node_id))]
    for text in shown:
        assert PASSWORD not in text and "wrong-pw" not in text

    audit = [json.loads(line) for line in (node.data_dir / "audit.log").read_text().splitlines()]
    fetches = [event for event in audit if event["event"] == "upstream-fetch" and event["repository"] == name]
    assert {(e["method"], e["reference"], e["outcome"]) for e in fetches} >= {
        ("GET", "v1", "ok"), ("GET", "tags/list", "ok")}
    assert all(e["upstream"] == basic_upstream.url and e["upstream_name"] == REPO for e in fetches)
    assert hub.public()["credentials"] == "user puller" and PASSWORD not in json.dumps(hub.public())
    assert PASSWORD not in repr(hub)

