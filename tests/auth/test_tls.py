"""HTTPS on the registry API (--tls-cert/--tls-key), on both server runtimes, with access control:
httpx verifies the certificate against a throw-away CA, skopeo pushes and pulls with the CA in a
cert dir (and with --tls-verify=false), the token realm is https, and plain HTTP gets nowhere."""

from __future__ import annotations

import shutil
import ssl

import httpx
import pytest

from tests.auth.conftest import TokenAuth, parse_challenge, provision
from tests.support import skopeo
from tests.support.node import NodeProcess
from tests.support.oci import build_image, push_image, read_oci_layout, write_oci_layout
from tests.support.skopeo import docker_ref, oci_ref
from tests.support.tls import make_ca_and_certs

pytestmark = pytest.mark.anyio


class TLSNode(NodeProcess):
    def __init__(self, *args, ca, **kwargs):
        super().__init__(*args, **kwargs)
        self.ca = ca

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ready_client(self) -> httpx.Client:
        return httpx.Client(timeout=2.0, verify=ssl.create_default_context(cafile=str(self.ca)))


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def tls_node(request, tmp_path_factory, etcd, cluster_name):
    certs = make_ca_and_certs(tmp_path_factory.mktemp("tls"), ["registry"])
    cert, key = certs["registry"]
    cluster = f"{cluster_name}-{request.param}"
    provision(etcd.url, cluster)
    node = TLSNode(tmp_path_factory.mktemp(f"tls-{request.param}"), etcd_url=etcd.url, cluster=cluster,
                   runtime=request.param, ca=certs["ca"],
                   extra_args=["--auth", "on", "--tls-cert", str(cert), "--tls-key", str(key)])
    node.start()
    try:
        yield node
    finally:
        node.stop()


async def test_https_with_verified_certificate(tls_node):
    async with httpx.AsyncClient(base_url=tls_node.url, verify=ssl.create_default_context(cafile=str(tls_node.ca))) as c:
        r = await c.get("/v2/")
        assert r.status_code == 401
        assert parse_challenge(r.headers["www-authenticate"])["realm"] == f"{tls_node.url}/token"
    image = build_image(f"tls-{tls_node.runtime}")
    async with httpx.AsyncClient(base_url=tls_node.url, verify=ssl.create_default_context(cafile=str(tls_node.ca)),
                                 auth=TokenAuth("alice", "alice-password")) as alice:
        await push_image(alice, "team/tls", "latest", image)
        r = await alice.get("/v2/team/tls/manifests/latest", headers={"Accept": image.media_type})
        assert r.status_code == 200 and r.content == image.manifest
    async with httpx.AsyncClient(base_url=tls_node.url) as unverified:       # the system CAs do not know it
        with pytest.raises(httpx.ConnectError):
            await unverified.get("/v2/")
    async with httpx.AsyncClient(base_url=tls_node.url.replace("https", "http")) as plain:
        with pytest.raises(httpx.HTTPError):
            r = await plain.get("/v2/")
            assert r.status_code >= 400


async def test_skopeo_over_https(tls_node, tmp_path):
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    shutil.copy(tls_node.ca, cert_dir / "ca.crt")
    image = build_image(f"tls-skopeo-{tls_node.runtime}")
    src = write_oci_layout(tmp_path / "src", {"v1": image})
    ref = docker_ref(tls_node.host_port, "team/tls-skopeo", "v1")
    await skopeo.skopeo("copy", "--dest-cert-dir", str(cert_dir), "--dest-creds", "alice:alice-password",
                        "--authfile", "@AUTHFILE@", oci_ref(src, "v1"), ref.replace(":v1", ":latest"))
    await skopeo.skopeo("copy", "--src-cert-dir", str(cert_dir), "--src-creds", "reader:reader-password",
                        "--authfile", "@AUTHFILE@", ref.replace(":v1", ":latest"), oci_ref(tmp_path / "back", "x"))
    _, blobs = read_oci_layout(tmp_path / "back")
    assert all(blobs.get(d) == data for d, data in image.blobs.items())
    await skopeo.skopeo("inspect", "--tls-verify=false", "--creds", "reader:reader-password", "--authfile",
                        "@AUTHFILE@", ref.replace(":v1", ":latest"))
    with pytest.raises(skopeo.SkopeoError):        # verification on, without the CA: refused
        await skopeo.skopeo("inspect", "--creds", "reader:reader-password", "--authfile", "@AUTHFILE@",
                            ref.replace(":v1", ":latest"))
