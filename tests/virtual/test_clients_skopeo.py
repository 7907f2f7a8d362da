"""skopeo through a virtual repository declared with the CLI (`cargohold repo add dev --virtual
--members team-a,hub --deploy-to team-a`) on a two-node cluster: a push through the virtual name
lands in the deployment target and reads back identical through either name and node; a virtual
repository without a target refuses pushes; `skopeo list-tags` merges the members' tags and the
first member's image of a tag wins; the members' globs keep names from the upstream (counted in
its own access log); a virtual repository nested in another, the cycle refused, `repo show`,
`list` and `remove`."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from tests.support.oci import build_image, write_oci_layout
from tests.support.poll import until
from tests.support.skopeo import SkopeoError, copy, docker_ref, inspect, list_tags, oci_ref
from tests.virtual.conftest import pull_identical, served, skopeo_push

pytestmark = pytest.mark.anyio

if shutil.which("skopeo") is None:
    pytest.skip("skopeo not installed (Debian package skopeo)", allow_module_level=True)


async def test_push_through_the_virtual_name_reads_back_identical_through_it_and_the_target(
        e2e_cluster, e2e_upstream, e2e_names, tmp_path):
    names = e2e_names
    hub = e2e_cluster.add_remote(names.hub, e2e_upstream.url)
    dev = e2e_cluster.add_virtual(names.dev, [names.team_a, hub], "--deploy-to", names.team_a)
    first, second = e2e_cluster.members
    image = build_image(f"myapp-{uuid.uuid4().hex[:6]}", layers=3, layer_size=50_000)
    layout = write_oci_layout(tmp_path / "myapp", {"1.0": image})

    await copy(oci_ref(layout, "1.0"), docker_ref(first.host_port, f"{dev}/myapp", "1.0"))

    for node in (first, second):
        for name in (f"{dev}/myapp", f"{names.team_a}/myapp"):
            await pull_identical(node, name, "1.0", image, tmp_path)
        assert served(node, f"{dev}/myapp", "1.0").member == f"{names.team_a}/myapp"


async def test_an_image_pulled_through_the_virtual_name_is_promoted_into_it_with_skopeo_copy(
        e2e_cluster, e2e_upstream, e2e_names, tmp_path):
    """`skopeo copy docker://NODE/dev/library/base:v1 docker://NODE/dev/myapp:1.0`: the everyday
    "promote the upstream image" (and "push an image built FROM it") flow, whose layers the cache
    already holds."""
    names = e2e_names
    base = build_image(f"base-{names.dev}", layers=2, layer_size=100_000)
    e2e_upstream.seed(tmp_path, f"library/base-{names.dev}", "v1", base)
    hub = e2e_cluster.add_remote(names.hub, e2e_upstream.url)
    dev = e2e_cluster.add_virtual(names.dev, [names.team_a, hub], "--deploy-to", names.team_a)
    node = e2e_cluster.members[0]
    source = docker_ref(node.host_port, f"{dev}/library/base-{names.dev}", "v1")
    await pull_identical(node, f"{dev}/library/base-{names.dev}", "v1", base, tmp_path)   # cached by hub

    await copy(source, docker_ref(node.host_port, f"{dev}/myapp", "1.0"))

    await pull_identical(node, f"{names.team_a}/myapp", "1.0", base, tmp_path)


async def test_a_virtual_repository_without_a_target_refuses_pushes_saying_why(
        e2e_cluster, e2e_names, tmp_path):
    dev = e2e_cluster.add_virtual(e2e_names.dev, [e2e_names.team_a])
    layout = write_oci_layout(tmp_path / "refused", {"1.0": build_image("refused")})

    with pytest.raises(SkopeoError) as refused:
        await copy(oci_ref(layout, "1.0"), docker_ref(e2e_cluster.members[0].host_port, f"{dev}/myapp", "1.0"))

    assert "denied" in refused.value.stderr.lower(), refused.value.stderr
    assert "without a deployment target" in refused.value.stderr, refused.value.stderr


async def test_skopeo_lists_the_members_tags_merged_and_the_first_members_image_wins(
        e2e_cluster, e2e_upstream, e2e_names, tmp_path):
    names, name = e2e_names, f"library/merged-{e2e_names.dev}"
    upstream_images = {tag: build_image(f"{name}-upstream-{tag}") for tag in ("v1", "v2")}
    local_images = {tag: build_image(f"{name}-local-{tag}") for tag in ("v2", "v3")}
    for tag, image in upstream_images.items():
        e2e_upstream.seed(tmp_path, name, tag, image)
    hub = e2e_cluster.add_remote(names.hub, e2e_upstream.url)
    dev = e2e_cluster.add_virtual(names.dev, [names.team_a, hub], "--deploy-to", names.team_a)
    first, second = e2e_cluster.members
    for tag, image in local_images.items():
        skopeo_push(first, tmp_path, f"{dev}/{name}", tag, image)

    assert await list_tags(docker_ref(second.host_port, f"{dev}/{name}")) == ["v1", "v2", "v3"]
    for tag, image in {"v1": upstream_images["v1"], **local_images}.items():
        assert (await inspect(docker_ref(second.host_port, f"{dev}/{name}", tag)))["Digest"] == image.digest, tag


async def test_member_globs_never_ask_the_upstream_for_an_excluded_name(e2e_cluster, e2e_upstream, e2e_names,
                                                                        tmp_path):
    names, suffix = e2e_names, uuid.uuid4().hex[:6]
    allowed, outside, excluded = f"library/alpine-{suffix}", f"evil/alpine-{suffix}", f"library/secret-{suffix}"
    images = {name: build_image(name) for name in (allowed, outside, excluded)}
    for name, image in images.items():
        e2e_upstream.seed(tmp_path, name, "3", image)
    hub = e2e_cluster.add_remote(names.hub, e2e_upstream.url)
    dev = e2e_cluster.add_virtual(names.dev, [names.team_a, hub], "--member-include", f"{hub}=library/**",
                                  "--member-exclude", f"{hub}=library/secret-*")
    seeding = {name: len(e2e_upstream.logged(f"/v2/{name}/")) for name in (outside, excluded)}

    node = e2e_cluster.members[0]
    assert (await inspect(docker_ref(node.host_port, f"{dev}/{allowed}", "3")))["Digest"] == images[allowed].digest
    for name in (outside, excluded):
        with pytest.raises(SkopeoError):
            await inspect(docker_ref(node.host_port, f"{dev}/{name}", "3"))
        assert served(node, f"{dev}/{name}", "3").status == 404
        assert served(node, f"{dev}/{name}", images[name].digest).status == 404

    # the upstream's own log: the allowed name was asked for, the others never since the seeding
    assert e2e_upstream.logged(f"/v2/{allowed}/manifests/", "GET")
    for name in (outside, excluded):
        assert len(e2e_upstream.logged(f"/v2/{name}/")) == seeding[name], name


async def test_a_nested_virtual_repository_and_the_cycle_refused(e2e_cluster, e2e_upstream, e2e_names, tmp_path):
    names = e2e_names
    remote_image, app = build_image(f"nested-{names.dev}"), build_image(f"nested-app-{names.dev}")
    e2e_upstream.seed(tmp_path, f"library/{names.dev}", "v1", remote_image)
    hub = e2e_cluster.add_remote(names.hub, e2e_upstream.url)
    dev = e2e_cluster.add_virtual(names.dev, [names.team_a, hub], "--deploy-to", names.team_a)
    outer = e2e_cluster.add_virtual(names.outer, [dev], "--deploy-to", dev)
    first, second = e2e_cluster.members

    # reads go through both levels; a push to the outer name lands in the inner one's target
    await pull_identical(first, f"{outer}/library/{names.dev}", "v1", remote_image, tmp_path)
    assert served(second, f"{outer}/library/{names.dev}", "v1").member == f"{hub}/library/{names.dev}"
    layout = write_oci_layout(tmp_path / "app", {"2.0": app})
    await copy(oci_ref(layout, "2.0"), docker_ref(second.host_port, f"{outer}/app", "2.0"))
    await pull_identical(first, f"{names.team_a}/app", "2.0", app, tmp_path)
    assert served(first, f"{outer}/app", "2.0").member == f"{names.team_a}/app"

    # dev -> outer -> dev: refused when declared, naming the cycle; dev stays as it was
    refused = e2e_cluster.cli("repo", "add", dev, "--virtual", "--members", f"{names.team_a},{hub},{outer}",
                              "--replace")
    assert refused.returncode != 0, refused.stdout
    message = refused.stderr + refused.stdout
    assert "cycle" in message and f"{dev} -> {outer} -> {dev}" in message, message
    shown = e2e_cluster.cli("repo", "show", dev, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [m["name"] for m in json.loads(shown.stdout)["members"]] == [names.team_a, hub]
    listed = e2e_cluster.cli("repo", "list", "--json")
    kinds = {row["name"]: row.get("kind") for row in json.loads(listed.stdout)}
    assert kinds[dev] == kinds[outer] == "virtual" and kinds[hub] == "remote", kinds

    # removed: every node stops resolving the name at once, and the members keep their content
    removed = e2e_cluster.cli("repo", "remove", outer)
    assert removed.returncode == 0, removed.stderr
    for node in (first, second):
        until(lambda: served(node, f"{outer}/app", "2.0").status == 404, what=f"{node.url} forgets {outer}")
        assert served(node, f"{names.team_a}/app", "2.0").digest == app.digest
