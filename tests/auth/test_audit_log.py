"""The audit log of a real node: one chained JSON line per login, denial, push, delete, admin
operation and configuration change; `cargohold audit verify` accepts it and finds an edited
or removed line; a restart continues the chain."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from tests.auth.conftest import cli
from tests.support.oci import build_image, push_image

pytestmark = pytest.mark.anyio


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _wait_for(path, predicate) -> list[dict]:
    """The audit events, once one of them satisfies `predicate`."""
    from tests.support.poll import eventually

    return await eventually(lambda: (events := _events(path)) and any(map(predicate, events)) and events,
                            what="an audit event")


async def test_events_are_recorded_and_the_chain_verifies(secured, tmp_path):
    repo = "team/audited"
    image = build_image("audited")
    async with secured.client("alice") as alice:
        await push_image(alice, repo, "latest", image)
        assert (await alice.delete(f"/v2/{repo}/manifests/latest")).status_code == 202
    async with httpx.AsyncClient(base_url=secured.url) as c:
        assert (await c.get("/v2/", auth=("alice", "not-it"))).status_code == 401
        assert (await c.get("/admin/nodes", auth=("admin", "admin-password"))).status_code not in (401, 403)
    added = cli("user", "add", "carol", "--password-stdin", "--bcrypt-cost", "4", input="carol-password\n",
                etcd=secured.etcd_url, cluster=secured.cluster)
    assert added.returncode == 0, added.stderr
    events = await _wait_for(secured.audit_log, lambda e: e["event"] == "config" and e.get("name") == "carol")

    def find(**fields) -> dict:
        found = [e for e in events if all(e.get(k) == v for k, v in fields.items())]
        assert found, f"no event {fields} in {events}"
        return found[-1]

    login = find(event="login", subject="user:alice", via="token")
    assert login["client"] == "127.0.0.1" and login["node"] == "n1" and "scope" in login
    push = find(event="push", repository=repo, reference="latest", tag="latest")
    assert push["digest"] == image.digest and push["subject"] == "user:alice"
    find(event="delete", repository=repo, reference="latest", subject="user:alice")
    find(event="denied", status=401, action="push", subject="anonymous")          # the token flow's first try
    find(event="login_failed", account="alice")
    find(event="admin", subject="user:admin", path="/admin/nodes")
    change = find(event="config", section="user", name="carol", change="put")
    assert "@" in change["by"]
    for event in events:
        assert {"time", "seq", "prev", "hash", "node", "event"} <= set(event)

    ok = cli("audit", "verify", str(secured.audit_log))
    assert ok.returncode == 0 and "chain intact" in ok.stdout, ok.stdout + ok.stderr

    lines = secured.audit_log.read_text().splitlines(keepends=True)
    edited = tmp_path / "edited.log"
    edited.write_text("".join(lines).replace('"reference":"latest"', '"reference":"stable"', 1))
    result = cli("audit", "verify", str(edited))
    assert result.returncode == 1 and "edited" in result.stdout, result.stdout
    removed = tmp_path / "removed.log"
    removed.write_text("".join(lines[:2] + lines[3:]))
    result = cli("audit", "verify", "--json", str(removed))
    assert result.returncode == 1 and json.loads(result.stdout)["ok"] is False
    reordered = tmp_path / "reordered.log"
    reordered.write_text("".join([lines[1], lines[0], *lines[2:]]))
    assert cli("audit", "verify", str(reordered)).returncode == 1
    assert cli("audit", "verify", str(tmp_path / "missing.log")).returncode == 2


async def test_a_restarted_node_continues_the_chain(secured):
    before = len(_events(secured.audit_log))
    await anyio.to_thread.run_sync(secured.node.restart)
    async with httpx.AsyncClient(base_url=secured.url) as c:
        assert (await c.get("/v2/")).status_code == 401
    events = _events(secured.audit_log)
    assert len(events) > before and events[-1]["seq"] == len(events) - 1
    assert cli("audit", "verify", str(secured.audit_log)).returncode == 0
