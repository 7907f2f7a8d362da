"""containerd (`ctr images pull`, a private daemon) through a virtual repository `dev` over a local
namespace and a remote repository: an image only the remote member has comes through its cache;
a local image of the same name and tag, pushed through the virtual name, shadows it on every node;
once deleted, the remote one is served again."""

from __future__ import annotations

import uuid

import httpx

from tests.support.containerd import image_digest
from tests.support.oci import build_image
from tests.virtual.conftest import served, skopeo_push


def test_a_local_image_shadows_the_remote_one_until_deleted(e2e_ctr, e2e_cluster, e2e_upstream, e2e_names,
                                                              tmp_path):
    names, tag = e2e_names, f"3-{uuid.uuid4().hex[:6]}"
    upstream_image = build_image(f"alpine-upstream-{tag}", layers=2, layer_size=100_000)
    local_image = build_image(f"alpine-local-{tag}", layers=2, layer_size=100_000)
    e2e_upstream.seed(tmp_path, "library/alpine", tag, upstream_image)
    hub = e2e_cluster.add_remote(names.hub, e2e_upstream.url)
    dev = e2e_cluster.add_virtual(names.dev, [names.team_a, hub], "--deploy-to", names.team_a)
    first, second = e2e_cluster.members
    name = f"{dev}/library/alpine"

    def ctr_pull(node) -> str:
        ref = f"{node.host_port}/{name}:{tag}"
        e2e_ctr("images", "rm", ref, check=False)
        e2e_ctr("images", "pull", "--plain-http", ref)
        return image_digest(e2e_ctr, ref)

    def everywhere(image, member: str) -> None:
        for node in (first, second):
            answer = served(node, name, tag)
            assert (answer.status, answer.digest, answer.member) == (200, image.digest, member), node.url

    # only the remote member has it: served through its cache
    assert ctr_pull(first) == upstream_image.digest
    everywhere(upstream_image, f"{hub}/library/alpine")

    # the same name and tag pushed through the virtual name lands in team-a and wins
    skopeo_push(second, tmp_path, name, tag, local_image)
    assert ctr_pull(first) == local_image.digest
    everywhere(local_image, f"{names.team_a}/library/alpine")

    # deletes go to the namespace that holds the image, not through the virtual name
    deleted_through_virtual = httpx.delete(f"{first.url}/v2/{name}/manifests/{local_image.digest}", timeout=30)
    assert deleted_through_virtual.status_code == 403, deleted_through_virtual.text
    deleted = httpx.delete(f"{first.url}/v2/{names.team_a}/library/alpine/manifests/{local_image.digest}",
                           timeout=30)
    assert deleted.status_code == 202, deleted.text

    # the remote one is served again
    assert ctr_pull(second) == upstream_image.digest
    everywhere(upstream_image, f"{hub}/library/alpine")
