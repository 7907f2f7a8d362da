"""Real clients against a node with access control: `skopeo login`, copies with --dest-creds /
--src-creds, an auth file written by login, and a Kubernetes imagePullSecret (dockerconfigjson)
used as the auth file."""

from __future__ import annotations

import base64
import json

import pytest

from tests.support import skopeo
from tests.support.oci import build_image, read_oci_layout, write_oci_layout
from tests.support.skopeo import SkopeoError, docker_ref, oci_ref

pytestmark = pytest.mark.anyio
TLS_OFF = ("--src-tls-verify=false", "--dest-tls-verify=false")


async def copy(src: str, dst: str, *extra: str) -> str:
    """skopeo copy over plain HTTP with the credentials given in `extra` (none: anonymous)."""
    return await skopeo.skopeo("copy", *TLS_OFF, "--authfile", "@AUTHFILE@", *extra, src, dst)


def _same_blobs(image, layout) -> bool:
    _, got = read_oci_layout(layout)
    return all(got.get(d) == data for d, data in image.blobs.items())


async def test_login_then_copy_with_the_auth_file(secured, tmp_path):
    authfile = tmp_path / "auth.json"
    host = secured.node.host_port
    out = await skopeo.skopeo("login", "--tls-verify=false", "--authfile", str(authfile), "-u", "alice",
                              "-p", "alice-password", host)
    assert "Login Succeeded" in out
    assert host in json.loads(authfile.read_text())["auths"]
    with pytest.raises(SkopeoError):
        await skopeo.skopeo("login", "--tls-verify=false", "--authfile", str(tmp_path / "bad.json"), "-u", "alice",
                            "-p", "wrong-password", host)
    image = build_image("skopeo-login", layers=2)
    src = write_oci_layout(tmp_path / "src", {"v1": image})
    await skopeo.skopeo("copy", *TLS_OFF, "--authfile", str(authfile), "--preserve-digests", oci_ref(src, "v1"),
                        docker_ref(host, "team/skopeo-login", "latest"))
    await skopeo.skopeo("copy", *TLS_OFF, "--authfile", str(authfile), docker_ref(host, "team/skopeo-login", "latest"),
                        oci_ref(tmp_path / "back", "x"))
    assert _same_blobs(image, tmp_path / "back")
    out = await skopeo.skopeo("logout", "--authfile", str(authfile), host)
    with pytest.raises(SkopeoError):   # logged out: anonymous may not pull team/
        await skopeo.skopeo("inspect", "--tls-verify=false", "--authfile", str(authfile),
                            docker_ref(host, "team/skopeo-login", "latest"))


async def test_copy_with_creds_flags_and_pull_only_user(secured, tmp_path):
    host = secured.node.host_port
    image = build_image("skopeo-creds", layers=2)
    src = write_oci_layout(tmp_path / "src", {"v1": image})
    await copy(oci_ref(src, "v1"), docker_ref(host, "team/skopeo-creds", "v1"), "--preserve-digests",
                      "--dest-creds", "robot$ci:" + secured.robots["robot$ci"])
    await copy(docker_ref(host, "team/skopeo-creds", "v1"), oci_ref(tmp_path / "back", "x"),
                      "--src-creds", "reader:reader-password")
    assert _same_blobs(image, tmp_path / "back")
    with pytest.raises(SkopeoError) as refused:        # reader may pull, not push
        await copy(oci_ref(src, "v1"), docker_ref(host, "team/skopeo-creds", "v2"),
                          "--dest-creds", "reader:reader-password")
    assert "denied" in refused.value.stderr.lower() or "unauthorized" in refused.value.stderr.lower()
    with pytest.raises(SkopeoError):                   # nor delete
        await skopeo.skopeo("delete", "--tls-verify=false", "--creds", "reader:reader-password",
                            docker_ref(host, "team/skopeo-creds", "v1"))
    with pytest.raises(SkopeoError):                   # protected tag v*: alice may not overwrite it
        await copy(oci_ref(src, "v1"), docker_ref(host, "team/skopeo-creds", "v1"),
                          "--dest-creds", "alice:alice-password")
    with pytest.raises(SkopeoError):                   # anonymous may not pull team/
        await skopeo.inspect(docker_ref(host, "team/skopeo-creds", "v1"))
    tags = json.loads(await skopeo.skopeo("list-tags", "--tls-verify=false", "--creds", "reader:reader-password",
                                          docker_ref(host, "team/skopeo-creds")))["Tags"]
    assert tags == ["v1"]


async def test_image_pull_secret_as_auth_file(secured, tmp_path):
    """What a kubelet gets from a `kubernetes.io/dockerconfigjson` secret, handed to skopeo."""
    host = secured.node.host_port
    image = build_image("pull-secret")
    src = write_oci_layout(tmp_path / "src", {"v1": image})
    await copy(oci_ref(src, "v1"), docker_ref(host, "team/pull-secret", "latest"),
                      "--dest-creds", "alice:alice-password")
    secret = {"auths": {host: {"auth": base64.b64encode(b"reader:reader-password").decode()}}}
    config = tmp_path / "dockerconfig.json"
    config.write_text(json.dumps(secret))
    inspected = json.loads(await skopeo.skopeo("inspect", "--tls-verify=false", "--authfile", str(config),
                                               docker_ref(host, "team/pull-secret", "latest")))
    assert inspected["Digest"] == image.digest
    await skopeo.skopeo("copy", *TLS_OFF, "--authfile", str(config), docker_ref(host, "team/pull-secret", "latest"),
                        oci_ref(tmp_path / "back", "x"))
    assert _same_blobs(image, tmp_path / "back")


async def test_anonymous_skopeo_pulls_public_images(secured, tmp_path):
    host = secured.node.host_port
    image = build_image("public-skopeo")
    src = write_oci_layout(tmp_path / "src", {"v1": image})
    await copy(oci_ref(src, "v1"), docker_ref(host, "public/tool", "1.0"), "--dest-creds", "alice:alice-password")
    await copy(docker_ref(host, "public/tool", "1.0"), oci_ref(tmp_path / "back", "x"))   # no credentials
    assert _same_blobs(image, tmp_path / "back")
    with pytest.raises(SkopeoError):
        await copy(oci_ref(src, "v1"), docker_ref(host, "public/tool", "2.0"))
