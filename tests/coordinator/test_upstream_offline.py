"""An upstream one node found offline is offline for every node of its site, and only its site:
the notice in etcd (`coordinator.upstreamstate`) and the upstream client that heeds it. The
upstream here is a real listening socket that accepts connections and never answers, so each
node that tries waits for its read timeout, and the test counts who tried."""

from __future__ import annotations

import time
import uuid

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.upstreamstate import SiteOfflineBoard
from cargohold.upstream.client import Timeouts, UpstreamClient
from cargohold.upstream.errors import UpstreamUnavailable

pytestmark = pytest.mark.anyio

READ_TIMEOUT = 0.5
PERIOD = 30.0


class SilentUpstream:
    """Accepts connections, reads what comes, never answers; counts the connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    async def serve(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._hold)

    async def _hold(self, stream) -> None:
        self.connections += 1
        async with stream:
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass


def _client(port: int, board: SiteOfflineBoard) -> UpstreamClient:
    return UpstreamClient(f"http://127.0.0.1:{port}", timeouts=Timeouts(connect=2.0, read=READ_TIMEOUT, total=5.0),
                          offline_period=PERIOD, board=board)


async def _ask(client: UpstreamClient) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as failed:
        await client.head_manifest("library/app", "v1")
    return str(failed.value), time.monotonic() - started


async def test_one_nodes_timeout_spares_its_sites_other_nodes_but_not_other_sites(etcd):
    cluster = f"offline-{uuid.uuid4().hex[:8]}"
    upstream = SilentUpstream()
    async with EtcdClient([etcd.url]) as etcd_client, anyio.create_task_group() as tg:
        await tg.start(upstream.serve)
        metadata = {node: ClusterMetadata(etcd_client, cluster, node) for node in ("a1", "a2", "b1")}
        boards = {"a1": SiteOfflineBoard(metadata["a1"], "east", "hub", "a1"),
                  "a2": SiteOfflineBoard(metadata["a2"], "east", "hub", "a2"),
                  "b1": SiteOfflineBoard(metadata["b1"], "west", "hub", "b1")}
        clients = {node: _client(upstream.port, board) for node, board in boards.items()}
        try:
            reason, waited = await _ask(clients["a1"])          # the first node waits for its timeout
            assert waited >= READ_TIMEOUT * 0.9 and upstream.connections == 1, (reason, waited)

            reason, waited = await _ask(clients["a2"])          # its site's other node does not try
            assert waited < READ_TIMEOUT and upstream.connections == 1, (reason, waited)
            assert "assumed offline" in reason and "timed out" in reason
            assert clients["a2"].offline.remaining() > PERIOD - 5

            reason, waited = await _ask(clients["b1"])          # another site tries for itself
            assert waited >= READ_TIMEOUT * 0.9 and upstream.connections == 2, (reason, waited)
        finally:
            for client in clients.values():
                await client.aclose()
            tg.cancel_scope.cancel()


async def test_a_notice_past_its_time_or_unreadable_is_ignored(etcd):
    cluster = f"offline-{uuid.uuid4().hex[:8]}"
    async with EtcdClient([etcd.url]) as etcd_client:
        metadata = ClusterMetadata(etcd_client, cluster, "a1")
        board = SiteOfflineBoard(metadata, "east", "hub", "a1")
        assert await board.posted() is None
        await board.post(0.3, "timed out")
        remaining, reason = await board.posted()
        assert 0 < remaining <= 0.3 and reason == "timed out"
        await anyio.sleep(0.4)
        assert await board.posted() is None
        await etcd_client.put(metadata.keys.upstream_offline("east", "hub"), b"not json")
        assert await board.posted() is None
        assert await SiteOfflineBoard(metadata, "west", "hub", "a1").posted() is None
