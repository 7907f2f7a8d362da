"""The node-to-node gRPC port serves the cluster's nodes only (issue 12): a raw gRPC client without
the cluster's peer credential, or with a wrong, replayed or expired one, gets UNAUTHENTICATED for
every method, while the nodes replicate as before; a rotated secret reaches every node without a
restart; `--grpc-insecure` is refused on a public address and works on loopback; a malformed
stored secret stops a node at start-up; under mutual TLS the credential is still checked.

Real etcd, real node processes, real grpc: the client is the generated stub on a plain channel
(a TLS one with a certificate from the nodes' CA in the mutual TLS test).
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

from cargohold.auth.peer import MAX_SKEW, METADATA_KEY, PeerSecrets, sign
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.peersecret import PeerSecretStore
from cargohold.replication.v1 import replication_pb2 as pb
from cargohold.replication.v1 import replication_pb2_grpc as pb_grpc
from tests.cluster.conftest import client_for
from tests.support import oci
from tests.support.node import NodeStartError, free_port
from tests.support.poll import eventually
from tests.support.tls import make_ca_and_certs

pytestmark = pytest.mark.anyio

SERVICE = "/cargohold.replication.v1.Replication/"


def call(port: int, method: str, digest: str, credential: str | None = None,
         tls: grpc.ChannelCredentials | None = None):
    """One raw call of `method` for `digest`; returns the reply (streams read to the end)."""
    metadata = [(METADATA_KEY, credential)] if credential is not None else None
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, tls) as channel:
        stub = pb_grpc.ReplicationStub(channel)
        if method == "StatBlob":
            return stub.StatBlob(pb.StatBlobRequest(digest=digest), timeout=10, metadata=metadata)
        if method == "ReadBlob":
            return b"".join(c.data for c in stub.ReadBlob(pb.ReadBlobRequest(digest=digest), timeout=10,
                                                          metadata=metadata))
        return b"".join(c.data for c in stub.ReadBlobs(pb.ReadBlobsRequest(digests=[digest]), timeout=10,
                                                       metadata=metadata))


def refused(port: int, method: str, digest: str, credential: str | None = None,
            tls: grpc.ChannelCredentials | None = None) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(port, method, digest, credential, tls)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, caught.value)
    return caught.value.details()


def signed(secrets: PeerSecrets, method: str, at: float | None = None) -> str:
    return sign(secrets.signing, SERVICE + method, time.time() if at is None else at)


async def stored_secrets(cluster) -> PeerSecrets:
    async with EtcdClient([cluster.etcd_url]) as client:
        return await PeerSecretStore(client, cluster.name).ensure()


async def push(node, repo: str, data: bytes) -> str:
    async with client_for(node) as client:
        return await oci.push_blob(client, repo, data)


async def test_the_grpc_port_refuses_every_call_without_a_valid_credential(cluster):
    a = cluster.add("a", settings={"replicas_per_site": 2})
    cluster.add("b", settings={"replicas_per_site": 2})
    data = os.urandom(300_000)
    digest = await push(a, "private/app", data)
    # The nodes sign their calls: b fetches its copy from a as before.
    cluster.wait_until(lambda: cluster.holders().get(digest) == {"a", "b"}, what="b's copy from a")
    secrets = await stored_secrets(cluster)
    stranger = PeerSecrets.generate(time.time())
    for method in ("StatBlob", "ReadBlob", "ReadBlobs"):
        assert "no peer credential" in refused(a.grpc_port, method, digest)
        assert "malformed" in refused(a.grpc_port, method, digest, "Bearer " + secrets.signing.hex())
        assert "wrong" in refused(a.grpc_port, method, digest, signed(stranger, method))
        other = "ReadBlob" if method == "StatBlob" else "StatBlob"       # a header captured from another method
        assert "wrong" in refused(a.grpc_port, method, digest, signed(secrets, other))
        assert "clock" in refused(a.grpc_port, method, digest,          # a header captured long ago
                                  signed(secrets, method, at=time.time() - MAX_SKEW - 60))
    with grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel:   # unknown methods say no more
        unknown = channel.unary_unary(SERVICE + "ListBlobs")
        with pytest.raises(grpc.RpcError) as caught:
            unknown(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The same calls, signed with the cluster's secret, are served.
    assert call(a.grpc_port, "StatBlob", digest, signed(secrets, "StatBlob")).size == len(data)
    assert call(a.grpc_port, "ReadBlob", digest, signed(secrets, "ReadBlob")) == data
    assert call(a.grpc_port, "ReadBlobs", digest, signed(secrets, "ReadBlobs")) == data
    assert "refused a gRPC call from" in a.log_tail(200)


async def test_a_rotated_peer_secret_reaches_every_node_without_a_restart(cluster):
    a = cluster.add("a", settings={"replicas_per_site": 2})
    b = cluster.add("b", settings={"replicas_per_site": 2})
    first = await stored_secrets(cluster)
    digest = await push(a, "rot/app", os.urandom(100_000))
    cluster.wait_until(lambda: cluster.holders().get(digest) == {"a", "b"}, what="b's copy")

    result = cluster.cli("access", "rotate-peer-secret")
    assert result.returncode == 0, result.stderr
    second = await stored_secrets(cluster)
    assert second.signing != first.signing and second.secrets[1:] == (first.signing,)

    def served_with(secrets: PeerSecrets):
        return lambda: all(call(n.grpc_port, "StatBlob", digest, signed(secrets, "StatBlob")).present for n in (a, b))
    await eventually(served_with(second), what="both nodes to accept the new secret")
    assert served_with(first)()                     # calls signed a moment before the rotation still pass
    after = await push(b, "rot/app", os.urandom(100_000))
    cluster.wait_until(lambda: cluster.holders().get(after) == {"a", "b"}, what="a copy made under the new secret")

    result = cluster.cli("access", "rotate-peer-secret", "--drop-old")
    assert result.returncode == 0, result.stderr
    third = await stored_secrets(cluster)
    assert third.secrets == (third.signing,)

    def old_refused():
        for node in (a, b):
            refused(node.grpc_port, "StatBlob", digest, signed(second, "StatBlob"))
        return True
    await eventually(old_refused, what="both nodes to refuse the dropped secret")
    assert served_with(third)()
    last = await push(a, "rot/app", os.urandom(100_000))
    cluster.wait_until(lambda: cluster.holders().get(last) == {"a", "b"}, what="a copy made after --drop-old")


async def test_grpc_insecure_is_refused_on_a_public_address_and_allowed_on_loopback(cluster):
    port = free_port()
    everywhere = {"replicas_per_site": 2}
    public = cluster.add("pub", start=False, settings=everywhere,
                         args=["--grpc-listen", f"0.0.0.0:{port}", "--grpc-insecure"])
    public.grpc_port = port
    with pytest.raises(NodeStartError):
        public.start()
    assert public.proc.returncode == 2 and "--grpc-insecure" in public.log_tail(), public.log_tail()

    public.extra_args = [a for a in public.extra_args if a != "--grpc-insecure"]   # authenticated: starts
    public.start()
    digest = await push(public, "open/app", os.urandom(1000))
    refused(port, "StatBlob", digest)

    local = cluster.add("local", settings=everywhere, args=["--grpc-insecure"])   # loopback: no check, as asked
    assert call(local.grpc_port, "StatBlob", "sha256:" + "0" * 64).present is False
    assert "--grpc-insecure" in local.log_tail(200)
    # It still signs its own calls, so it fetches its copy from the authenticated node.
    cluster.wait_until(lambda: cluster.holders().get(digest) == {"pub", "local"}, what="local's copy from pub")


async def test_a_node_refuses_to_start_on_a_malformed_peer_secret(cluster):
    async with EtcdClient([cluster.etcd_url]) as client:
        await client.put(Keys(cluster.name).peer_secret(), b"{}")      # a bad hand edit of etcd
    node = cluster.add("a", start=False)
    with pytest.raises(NodeStartError):
        node.start()
    assert node.proc.returncode == 2 and "rotate-peer-secret --drop-old" in node.log_tail(), node.log_tail()
    assert cluster.cli("access", "rotate-peer-secret", "--drop-old").returncode == 0
    node.start()                                                        # the operator's fix is enough


async def test_mutual_tls_does_not_replace_the_credential(cluster, tmp_path):
    files = make_ca_and_certs(tmp_path / "tls", ["node", "client"])
    tls_args = ["--grpc-tls-cert", str(files["node"][0]), "--grpc-tls-key", str(files["node"][1]),
                "--grpc-tls-ca", str(files["ca"])]
    cert, key = (path.read_bytes() for path in files["client"])
    signed_by_the_ca = grpc.ssl_channel_credentials(files["ca"].read_bytes(), key, cert)
    port = free_port()
    node = cluster.add("a", start=False, args=["--grpc-listen", f"0.0.0.0:{port}", *tls_args])
    node.grpc_port = port
    node.start()
    digest = await push(node, "tls/app", os.urandom(1000))
    secrets = await stored_secrets(cluster)
    assert "no peer credential" in refused(port, "StatBlob", digest, tls=signed_by_the_ca)   # a certificate alone
    assert call(port, "StatBlob", digest, signed(secrets, "StatBlob"), signed_by_the_ca).present

    node.stop()                                  # the switch is accepted off loopback under mutual TLS ...
    node.extra_args.append("--grpc-insecure")
    node.start()
    assert call(port, "StatBlob", digest, tls=signed_by_the_ca).present     # ... where the CA alone gates the port
    with pytest.raises(grpc.RpcError):
        call(port, "StatBlob", digest)                                      # and a plain client still gets nothing
