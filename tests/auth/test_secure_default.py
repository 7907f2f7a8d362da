"""Secure by default: a cluster without accounts is open on loopback only. On a non-loopback
address a node refuses to start unless access control is configured (accounts, rules or an
htpasswd file) or --insecure-open is given; once accounts exist, even a loopback node enforces."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest

from cargohold.auth.passwords import hash_password
from tests.auth.conftest import cli, provision
from tests.support.node import NodeProcess, NodeStartError, free_port
from tests.support.oci import build_image, push_image
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


def _node(tmp_path_factory, etcd, cluster: str, *extra: str) -> NodeProcess:
    return NodeProcess(tmp_path_factory.mktemp("secure"), etcd_url=etcd.url, cluster=cluster, extra_args=list(extra))


def _refused(node: NodeProcess, text: str) -> None:
    with pytest.raises(NodeStartError):
        node.start()
    assert node.proc.returncode == 2 and text in node.log_tail(), node.log_tail()


def _public(node: NodeProcess) -> str:
    node.port = node.port or free_port()
    return f"0.0.0.0:{node.port}"


def test_open_cluster_refuses_a_public_address(tmp_path_factory, etcd):
    cluster = f"t-open-{uuid.uuid4().hex[:8]}"
    node = _node(tmp_path_factory, etcd, cluster)
    node.extra_args = ["--listen", _public(node)]
    _refused(node, "--insecure-open")
    node.extra_args = ["--listen", _public(node), "--auth", "off"]
    _refused(node, "--insecure-open")
    node.extra_args = ["--listen", _public(node), "--insecure-open"]
    node.start()
    try:
        with httpx.Client(base_url=node.url) as c:
            assert c.get("/v2/").status_code == 200          # open, because the operator said so
    finally:
        node.stop()


def test_configured_cluster_enforces_on_a_public_address(tmp_path_factory, etcd, tmp_path):
    cluster = f"t-conf-{uuid.uuid4().hex[:8]}"
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"erin:{hash_password('erin-password', 4)}\n")
    node = _node(tmp_path_factory, etcd, cluster)
    node.extra_args = ["--listen", _public(node), "--htpasswd", str(htpasswd)]
    node.start()
    try:
        with httpx.Client(base_url=node.url) as c:
            assert c.get("/v2/").status_code == 401
            assert c.get("/v2/", auth=("erin", "erin-password")).status_code == 200     # an htpasswd user
            assert c.post("/v2/a/blobs/uploads/").status_code == 401
            assert c.post("/v2/a/blobs/uploads/", auth=("erin", "erin-password")).status_code == 202
    finally:
        node.stop()
    provision(etcd.url, cluster, users={"admin": "admin-password"}, robots=(), rules=None)
    node.extra_args = ["--listen", _public(node)]                    # accounts in etcd: starts, enforces
    node.start()
    try:
        with httpx.Client(base_url=node.url) as c:
            assert c.get("/v2/").status_code == 401
            assert c.get("/v2/", auth=("admin", "admin-password")).status_code == 200
        assert cli("user", "remove", "admin", etcd=etcd.url, cluster=cluster).returncode == 0
        with httpx.Client(base_url=node.url) as c:                  # no account left: still closed
            assert c.post("/v2/a/blobs/uploads/").status_code == 401
    finally:
        node.stop()


async def test_loopback_node_is_open_until_the_first_account(tmp_path_factory, etcd):
    cluster = f"t-loop-{uuid.uuid4().hex[:8]}"
    node = _node(tmp_path_factory, etcd, cluster)
    await anyio.to_thread.run_sync(node.start)
    try:
        async with httpx.AsyncClient(base_url=node.url) as c:
            await push_image(c, "anyone/app", "latest", build_image("open-loopback"))
            added = await anyio.to_thread.run_sync(lambda: cli("user", "add", "first", "--admin", "--password-stdin",
                                                               "--bcrypt-cost", "4", input="first-password\n",
                                                               etcd=etcd.url, cluster=cluster))
            assert added.returncode == 0, added.stderr
            async def closed() -> bool:             # the node learns of the account through its watch
                return (await c.post("/v2/anyone/app/blobs/uploads/")).status_code == 401
            await eventually(closed, what="the node to close with its first account")
            assert (await c.get("/v2/anyone/app/manifests/latest")).status_code == 401
            r = await c.get("/v2/anyone/app/manifests/latest", auth=("first", "first-password"))
            assert r.status_code == 200
    finally:
        await anyio.to_thread.run_sync(node.stop)
