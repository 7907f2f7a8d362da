"""What the fill engine's tests share: in-process cluster nodes (each a ClusterMetadata that
follows the watch and holds a membership lease, its own blob store and a BlobFiller; with
`follow`, also the node's real gRPC replication server and peer client, so that nodes follow
each other's fills) on the session's real etcd, and a blob upstream whose body the test paces
(`PacedUpstream`)."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import anyio
from anyio.abc import SocketStream

from cargohold.blobs.store import FilesystemBlobStore
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.records import Member
from cargohold.oci.reference import Digest, parse_digest
from cargohold.pullthrough.fill import BlobFiller
from cargohold.replication.remote import PeerContent
from cargohold.replication.sources import Holders, ReplicationSettings
from cargohold.replication.transfer import PeerClient, ReplicationService, grpc_server
from cargohold.repositories.definitions import RemoteRepository
from cargohold.repositories.routing import route
from cargohold.upstream.client import UpstreamClient
from tests.support.oci import random_bytes


class Figures:
    """Records what the filler counts (CacheFigures' interface)."""

    def __init__(self) -> None:
        self.fills: Counter = Counter()
        self.upstream_calls: list[tuple[str, str, str, int]] = []

    def fill(self, repository: str, outcome: str) -> None:
        self.fills[outcome] += 1

    def upstream(self, repository: str, method: str, outcome: str, received: int = 0) -> None:
        self.upstream_calls.append((repository, method, outcome, received))


@dataclass
class FillNode:
    node_id: str
    metadata: ClusterMetadata
    store: FilesystemBlobStore
    filler: BlobFiller
    figures: Figures
    audited: list[dict] = field(default_factory=list)
    scope: anyio.CancelScope | None = None
    grpc: str = "127.0.0.1:1"              # its replication server, when the nodes follow each other's fills
    service: ReplicationService | None = None

    def waiting(self) -> bool:
        """Whether this node waits for another node's fill (its claim attempt found that one)."""
        return any(fill.following for fill in self.filler._fills.values())

    def stop(self) -> None:
        """Stop the node's tasks as a shutdown would (its lease is revoked on the way out)."""
        self.scope.cancel()


async def _node_life(client: EtcdClient, cluster: str, node: FillNode, *, task_status) -> None:
    with anyio.CancelScope() as scope:
        node.scope = scope
        async with anyio.create_task_group() as tasks:
            await tasks.start(node.metadata.run)
            member = await node.metadata.register(
                Member(node.node_id, "default", "http://127.0.0.1:1", node.grpc, "active"))   # peers find its gRPC
            tasks.start_soon(node.metadata.keep_membership, member, 3)
            await node.metadata.lease_granted.wait()
            await tasks.start(node.filler.run)
            task_status.started()


@asynccontextmanager
async def fill_cluster(etcd_url: str, data: Path, nodes: int = 3, *, follow: bool = False,
                       stall_timeout: float = 30.0, max_followers: int = 8,
                       **filler_options) -> AsyncIterator[list[FillNode]]:
    cluster = f"fill-{uuid.uuid4().hex[:8]}"
    async with EtcdClient([etcd_url], retry_timeout=5.0) as client, AsyncExitStack() as servers:
        async with anyio.create_task_group() as tasks:
            started = []
            for i in range(1, nodes + 1):
                node_id = f"n{i}"
                metadata = ClusterMetadata(client, cluster, node_id)
                store = FilesystemBlobStore(data / node_id)
                figures = Figures()
                node = FillNode(node_id, metadata, store, None, figures)
                remote = await _peer_side(servers, node, stall_timeout, max_followers) if follow else None
                node.filler = BlobFiller(metadata, store, remote, node_id, figures=figures,
                                         audit=lambda event, _node=node, **fields: _node.audited.append(
                                             {"event": event, **fields}), **filler_options)
                if node.service is not None:
                    node.service.open_fill = node.filler.tail_from_thread
                await tasks.start(_node_life, client, cluster, node)
                started.append(node)
            yield started
            tasks.cancel_scope.cancel()


async def _peer_side(servers: AsyncExitStack, node: FillNode, stall_timeout: float,
                     max_followers: int) -> PeerContent:
    """The node's replication server (it serves its fills to peers; no blobs, no credential:
    loopback only) and its way of following the others' fills, as `node.server` wires them."""
    node.service = ReplicationService(lambda digest: None, lambda digest: digest.startswith("sha256:"),
                                      stall_timeout=stall_timeout, max_followers=max_followers)
    port = await servers.enter_async_context(grpc_server("127.0.0.1:0", node.service, keyring=None))
    node.grpc = f"127.0.0.1:{port}"
    peers = PeerClient()
    servers.callback(peers.close)
    return PeerContent(node.metadata, peers, Holders(node.metadata, ReplicationSettings(node.node_id, "default")))


def remote_route(upstream_url: str, upstream_name: str, repository: str = "hub"):
    definition = RemoteRepository(repository, upstream_url)
    return route({repository: definition}, f"{repository}/{upstream_name}")


async def read_all(blob, start: int = 0, length: int | None = None) -> bytes:
    out = bytearray()
    async with aclosing(blob.read(start, blob.size - start if length is None else length)) as chunks:
        async for chunk in chunks:
            out += chunk
    return bytes(out)


async def pull(cluster: list[FillNode], node: FillNode, upstream: UpstreamClient, the_route, digest: str) -> bytes:
    """What a GET of the blob through `node` would send: the fill's stream, or (None: the
    cluster has it, now linked into the route's repository) a holder's copy."""
    parsed = parse_digest(digest)
    blob = await node.filler.open(upstream, the_route, parsed)
    if blob is not None:
        return await read_all(blob)
    assert await node.metadata.blob_in_repo(the_route.local_name, digest) is not None
    return await read_published(cluster, node, parsed)


async def read_published(cluster: list[FillNode], node: FillNode, digest: Digest) -> bytes:
    """The blob from `node`'s store, or from a node that holds a copy (as a peer read would)."""
    holders = node.metadata.holders(str(digest))
    for holder in sorted(cluster, key=lambda n: n is not node):
        if holder.node_id in holders:
            return await holder.store.read_all(digest)
    raise AssertionError(f"{digest}: no node holds it ({holders})")


# ---------------------------------------------------------------------- a paced upstream
@dataclass
class PacedBlob:
    """One blob the paced upstream serves: `body` (what it sends, right or wrong) under `digest`,
    `pause_at` bytes sent before it waits for `resume` (None: no pause), and with `cut` the
    connection closes there instead of going on."""
    digest: str
    body: bytes
    pause_at: int | None = None
    cut: bool = False
    resume: anyio.Event = field(default_factory=anyio.Event)
    paused: anyio.Event = field(default_factory=anyio.Event)

    @classmethod
    def of(cls, size: int, seed: str, **pacing) -> "PacedBlob":
        """`size` pseudo-random bytes from `seed`, served under their own digest."""
        body = random_bytes(size, seed)
        return cls("sha256:" + hashlib.sha256(body).hexdigest(), body, **pacing)


@dataclass
class PacedUpstream:
    url: str
    blobs: dict[str, PacedBlob]
    gets: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)


async def _serve_paced(upstream: PacedUpstream, stream: SocketStream) -> None:
    async with stream:
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                head += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
        method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        blob = upstream.blobs.get(path.rsplit("/", 1)[-1]) if "/blobs/" in path else None
        if blob is None:
            await stream.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        (upstream.heads if method == "HEAD" else upstream.gets).append(path)
        await stream.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(blob.body)}\r\nConnection: close\r\n"
                          f"Content-Type: application/octet-stream\r\n\r\n".encode())
        if method == "HEAD":
            return
        first = len(blob.body) if blob.pause_at is None else blob.pause_at
        try:
            await _send_in_pieces(stream, blob.body[:first])
            if blob.pause_at is not None:
                blob.paused.set()
                await blob.resume.wait()
                if blob.cut:
                    return
            await _send_in_pieces(stream, blob.body[first:])
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return


async def _send_in_pieces(stream: SocketStream, data: bytes, piece: int = 256 * 1024) -> None:
    for offset in range(0, len(data), piece):
        await stream.send(data[offset:offset + piece])


@asynccontextmanager
async def paced_upstream(*blobs: PacedBlob) -> AsyncIterator[PacedUpstream]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    upstream = PacedUpstream(f"http://127.0.0.1:{port}", {b.digest: b for b in blobs})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, lambda stream: _serve_paced(upstream, stream))
        try:
            yield upstream
        finally:
            tasks.cancel_scope.cancel()


@asynccontextmanager
async def paced_cluster(etcd_url: str, data: Path, *blobs: PacedBlob, nodes: int = 2, **options):
    """(a paced upstream serving `blobs`, `nodes` in-process nodes, a client of the upstream, the
    route of an image of it). `options` go to fill_cluster."""
    async with paced_upstream(*blobs) as server, fill_cluster(etcd_url, data, nodes, **options) as started, \
            UpstreamClient(server.url) as upstream:
        yield server, started, upstream, remote_route(server.url, "library/app")
