"""An upstream assumed offline, shared by the nodes of one site: `upstream/offline/<site>/<remote
repository>` -> `{"until": unix time, "reason": .., "node": ..}`, bound to the posting node's lease.

One node's failed call (a timeout, a refused connection, a 5xx or 429) then spares every node of its
site the same wait for the rest of the offline period. Per site, not per cluster: a site whose
internet link is down must not stop the other sites from fetching. The read model ignores these
keys; a node reads the one it needs before each upstream call (`OfflineBoard`, in
`cargohold.upstream.offline`), which costs one etcd range next to a call over the internet.
Failures to read or write etcd here are logged and ignored: the board only saves waiting.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import anyio

from cargohold.coordinator.etcd import EtcdError
from cargohold.coordinator.metadata import ClusterMetadata

log = logging.getLogger("cargohold.pullthrough")

BOARD_TIMEOUT = 2.0     # seconds: the board is advice, never worth a long wait


@dataclass(frozen=True)
class OfflineNotice:
    until: float          # unix time
    reason: str
    node: str

    def encode(self) -> bytes:
        return json.dumps({"until": self.until, "reason": self.reason, "node": self.node}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "OfflineNotice | None":
        try:
            document = json.loads(raw)
            return cls(float(document["until"]), str(document["reason"]), str(document["node"]))
        except (ValueError, KeyError, TypeError):
            return None


class SiteOfflineBoard:
    """The offline board of one remote repository's upstream for this node's site."""

    def __init__(self, metadata: ClusterMetadata, site: str, repository: str, node_id: str):
        self._metadata = metadata
        self._key = metadata.keys.upstream_offline(site, repository)
        self._node = node_id

    async def posted(self) -> tuple[float, str] | None:
        """(seconds still offline, why) when a node of this site posted a notice that still holds."""
        raw = await self._bounded(self._metadata.client.get(self._key))
        notice = OfflineNotice.decode(raw.value) if raw is not None else None
        if notice is None:
            return None
        remaining = notice.until - time.time()
        if remaining <= 0:
            return None
        log.info("%s: assumed offline %.0fs more, as node %s found: %s", self._key, remaining, notice.node,
                 notice.reason)
        return remaining, notice.reason      # (clients are not told which node: the topology is ours)

    async def post(self, remaining: float, reason: str) -> None:
        """This node found the upstream offline for `remaining` more seconds."""
        notice = OfflineNotice(time.time() + remaining, reason, self._node)
        lease = self._metadata.lease or 0     # with the node's lease: a dead node's notice goes with it
        await self._bounded(self._metadata.client.put(self._key, notice.encode(), lease=lease))

    async def _bounded(self, call):
        with anyio.move_on_after(BOARD_TIMEOUT):
            try:
                return await call
            except EtcdError as exc:
                log.debug("offline board %s: %s", self._key, exc)
        return None
