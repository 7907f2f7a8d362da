"""The cluster's peer secret in etcd (`auth/peer-secret`, issue 12): what nodes sign their gRPC
calls to each other with (`cargohold.auth.peer`).

The first node of a cluster creates it in a create-if-missing transaction, so nodes that start
together agree on one secret without an operator. Every node then follows the key with its own
watch: `cargohold access rotate-peer-secret` reaches every node within a watch event, no
restart. Like the token signing keys, it is readable by whoever can read `auth/`: etcd access
stays the cluster's root credential.
"""

from __future__ import annotations

import logging
import time

import anyio

from cargohold.auth.peer import PeerSecrets
from cargohold.config import ConfigError
from cargohold.coordinator.etcd import Compare, EtcdClient, EtcdCompacted, Get, Put, WatchEvent
from cargohold.coordinator.keys import Keys

log = logging.getLogger("cargohold.peersecret")

ROTATE_RETRIES = 5


class PeerSecretStore:
    def __init__(self, client: EtcdClient, cluster: str):
        self._client = client
        self._key = Keys(cluster).peer_secret()
        self._secrets: PeerSecrets | None = None
        self._revision = 0

    def current(self) -> PeerSecrets:
        """The secrets in force. Safe from any thread (grpc's): one attribute read."""
        if self._secrets is None:
            raise RuntimeError("the peer secret is not loaded yet (call ensure first)")
        return self._secrets

    async def ensure(self) -> PeerSecrets:
        """Load the cluster's secret, creating it if the cluster has none (one transaction).
        A stored value that does not parse stops the node (ConfigError, so `serve` says why and
        exits 2): refusing every peer, or inventing a secret of its own, would split the cluster."""
        fresh = PeerSecrets.generate(time.time())
        result = await self._client.txn([Compare.missing(self._key)], [Put(self._key, fresh.encode())],
                                        [Get(self._key)])
        if result.succeeded:
            log.info("created this cluster's peer secret")
            self._secrets = fresh
        else:
            stored = result.responses[0][0].value
            try:
                self._secrets = PeerSecrets.decode(stored)
            except ValueError as exc:
                raise ConfigError(f"{self._key}: {exc}; run `cargohold access rotate-peer-secret "
                                   "--drop-old` to replace it") from None
        self._revision = result.revision
        return self._secrets

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Load (unless loaded), report started, then follow the key through rotations."""
        if self._secrets is None:
            await self.ensure()
        task_status.started()
        while True:
            try:
                async with self._client.watch_prefix(self._key, start_revision=self._revision + 1) as watch:
                    async for batch in watch:
                        for event in batch.events:
                            if event.key == self._key:
                                await self._apply(event)
                        self._revision = max(self._revision, batch.revision)
            except EtcdCompacted:
                log.warning("peer secret watch compacted: reading it again")
                await self.ensure()

    async def _apply(self, event: WatchEvent) -> None:
        if event.type == "delete":
            # Keep checking with what we had (never fail open); a new secret is created once
            # for the cluster, by whichever node gets there first, and reaches all of them.
            log.warning("the peer secret was deleted from etcd: creating a new one")
            await self.ensure()
            return
        try:
            self._secrets = PeerSecrets.decode(event.value)
        except ValueError as exc:
            log.error("ignoring a malformed peer secret written to etcd (%s); still using the previous one", exc)
            return
        log.info("the peer secret changed: signing with the new one")

    async def rotate(self, *, drop_old: bool) -> PeerSecrets:
        """Put a new signing secret in place; the previous one stays accepted unless `drop_old`.
        A malformed stored value is replaced outright."""
        for _ in range(ROTATE_RETRIES):
            kv = await self._client.get(self._key)
            now = time.time()
            if kv is None:
                new, guard = PeerSecrets.generate(now), Compare.missing(self._key)
            else:
                try:
                    new = PeerSecrets.decode(kv.value).rotated(now, drop_old=drop_old)
                except ValueError:
                    new = PeerSecrets.generate(now)
                guard = Compare.mod_revision_equals(self._key, kv.mod_revision)
            if (await self._client.txn([guard], [Put(self._key, new.encode())])).succeeded:
                return new
        raise RuntimeError(f"{self._key} kept changing while being rotated")
