"""skopeo with credentials (the Docker token flow) through a virtual repository on a node with
access control on: a push through the virtual name needs push there and on the deployment
target; a pull needs pull on the virtual name and on the member that serves the image — a member
the caller may not pull is skipped, and that denial is audited with the member."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from tests.auth.conftest import provision
from tests.support import skopeo
from tests.support.oci import build_image, write_oci_layout
from tests.support.poll import until
from tests.support.skopeo import SkopeoError, docker_ref, oci_ref
from tests.virtual.conftest import VirtualCluster

pytestmark = pytest.mark.anyio

if shutil.which("skopeo") is None:
    pytest.skip("skopeo not installed (Debian package skopeo)", allow_module_level=True)

TLS_OFF = ("--src-tls-verify=false", "--dest-tls-verify=false")
PASSWORDS = {"alice": "alice-password", "reader": "reader-password", "bob": "bob-password"}


def access_rules(dev: str, team_a: str, hub: str) -> dict:
    """alice pushes and pulls through dev (and team-a) but may not pull the cache hub; reader pulls
    everything and pushes nothing; bob pulls the members but not the virtual name."""
    return {"rules": [
        {"subjects": ["user:alice"], "repositories": [f"{dev}/**", f"{team_a}/**"], "actions": ["pull", "push"]},
        {"subjects": ["user:reader"], "repositories": [f"{dev}/**", f"{team_a}/**", f"{hub}/**"],
         "actions": ["pull"]},
        {"subjects": ["user:bob"], "repositories": [f"{team_a}/**", f"{hub}/**"], "actions": ["pull"]},
    ]}


def creds(login: str) -> str:
    return f"{login}:{PASSWORDS[login]}"


async def inspect_as(login: str, ref: str) -> str:
    """The digest `skopeo inspect --creds` shows for `ref`."""
    out = await skopeo.skopeo("inspect", "--tls-verify=false", "--authfile", "@AUTHFILE@", "--creds", creds(login),
                              ref)
    return json.loads(out)["Digest"]


def refused_access(failure: SkopeoError) -> bool:
    """skopeo failed because access was refused (not for a missing image or a broken transfer)."""
    return any(word in failure.stderr.lower() for word in ("denied", "unauthorized", "forbidden"))


def audited_denials(audit_log) -> list[dict]:
    if not audit_log.exists():
        return []
    events = [json.loads(line) for line in audit_log.read_text().splitlines() if line.startswith("{")]
    return [event for event in events if event.get("event") == "denied"]


@pytest.fixture
def e2e_secured(etcd, tmp_path, e2e_upstream, e2e_names):
    """One node with `--auth on` and an audit log; `hub` (over the session's upstream) and `dev` =
    [team-a, hub] -> team-a declared through the CLI before it starts."""
    names = e2e_names
    cluster = VirtualCluster(etcd.url, tmp_path / "secured", f"vr-access-{uuid.uuid4().hex[:8]}")
    provision(etcd.url, cluster.name, users=PASSWORDS, robots=(),
              rules=access_rules(names.dev, names.team_a, names.hub))
    cluster.add_remote(names.hub, e2e_upstream.url)
    cluster.add_virtual(names.dev, [names.team_a, names.hub], "--deploy-to", names.team_a)
    audit_log = tmp_path / "audit.log"
    try:
        node = cluster.add("n1", args=["--auth", "on", "--audit-log", str(audit_log)])
        yield node, audit_log
    finally:
        cluster.stop_all()


async def test_pushes_and_pulls_through_the_virtual_name_need_access_to_the_member(
        e2e_secured, e2e_upstream, e2e_names, tmp_path):
    node, audit_log = e2e_secured
    names, host = e2e_names, e2e_secured[0].host_port
    remote_name = f"library/access-{names.dev}"
    remote_image, app = build_image(f"{remote_name}-upstream"), build_image(f"app-{names.dev}")
    e2e_upstream.seed(tmp_path, remote_name, "v1", remote_image)
    layout = write_oci_layout(tmp_path / "app", {"1.0": app})

    # push: alice may push to dev and team-a; reader may push nowhere
    await skopeo.skopeo("copy", *TLS_OFF, "--authfile", "@AUTHFILE@", "--dest-creds", creds("alice"),
                        oci_ref(layout, "1.0"), docker_ref(host, f"{names.dev}/app", "1.0"))
    with pytest.raises(SkopeoError) as refused:
        await skopeo.skopeo("copy", *TLS_OFF, "--authfile", "@AUTHFILE@", "--dest-creds", creds("reader"),
                            oci_ref(layout, "1.0"), docker_ref(host, f"{names.dev}/app", "2.0"))
    assert refused_access(refused.value), refused.value.stderr
    assert await inspect_as("reader", docker_ref(host, f"{names.team_a}/app", "1.0")) == app.digest
    assert await inspect_as("reader", docker_ref(host, f"{names.dev}/app", "1.0")) == app.digest

    # pull needs the virtual name: bob may pull the member but not through dev
    assert await inspect_as("bob", docker_ref(host, f"{names.team_a}/app", "1.0")) == app.digest
    with pytest.raises(SkopeoError) as refused:
        await inspect_as("bob", docker_ref(host, f"{names.dev}/app", "1.0"))
    assert refused_access(refused.value), refused.value.stderr

    # ...and the member that serves: hub is skipped for alice (audited), served for reader
    with pytest.raises(SkopeoError) as refused:
        await inspect_as("alice", docker_ref(host, f"{names.dev}/{remote_name}", "v1"))
    assert refused_access(refused.value), refused.value.stderr
    assert await inspect_as("reader", docker_ref(host, f"{names.dev}/{remote_name}", "v1")) == remote_image.digest
    skipped = f"{names.hub}/{remote_name}"
    denials = until(lambda: [e for e in audited_denials(audit_log) if e.get("member") == skipped],
                    what=f"a denial of {skipped} in {audit_log}")
    assert all(e["subject"] == "user:alice" and e["repository"] == f"{names.dev}/{remote_name}" for e in denials), \
        denials
