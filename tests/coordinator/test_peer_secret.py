"""The cluster's peer secret in etcd (coordinator/peersecret.py): nodes that start together agree
on one; a rotation, a deletion or a malformed value reaches every follower the right way."""

from __future__ import annotations

import logging
import uuid

import anyio
import pytest

from cargohold.config import ConfigError
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.peersecret import PeerSecretStore
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


async def test_nodes_starting_together_agree_on_one_secret(etcd_client):
    cluster = f"ps-{uuid.uuid4().hex[:8]}"
    stores = [PeerSecretStore(etcd_client, cluster) for _ in range(8)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.ensure)
    assert len({store.current() for store in stores}) == 1
    assert await PeerSecretStore(etcd_client, cluster).ensure() == stores[0].current()   # a later node too


@pytest.fixture
def peer_secret_log():
    """What coordinator/peersecret.py logs (its own handler: other tests replace the root's)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("cargohold.peersecret")
    was_disabled = logger.disabled
    logger.disabled = False          # a logging dictConfig elsewhere in the session may have disabled it
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    logger.disabled = was_disabled


async def test_followers_take_rotations_and_a_deleted_secret_is_created_again(etcd, peer_secret_log):
    cluster = f"ps-{uuid.uuid4().hex[:8]}"
    async with EtcdClient([etcd.url]) as client, anyio.create_task_group() as tg:
        followers = [PeerSecretStore(client, cluster) for _ in range(2)]
        for follower in followers:
            await tg.start(follower.run)
        first = followers[0].current()

        rotated = await PeerSecretStore(client, cluster).rotate(drop_old=False)
        assert rotated.secrets[1:] == (first.signing,)
        await eventually(lambda: all(f.current() == rotated for f in followers), what="followers to rotate")

        key = Keys(cluster).peer_secret()
        await client.put(key, b"not a secret")             # a bad hand edit: ignored, never fails open
        await client.put(key + "-unrelated", b"x")          # a key that merely shares the prefix
        await eventually(lambda: sum("ignoring a malformed" in line for line in peer_secret_log) == 2,
                         what="both followers to ignore it")
        assert all(f.current() == rotated for f in followers)
        dropped = await PeerSecretStore(client, cluster).rotate(drop_old=True)   # replaces the bad value
        assert dropped.secrets == (dropped.signing,)
        await eventually(lambda: all(f.current() == dropped for f in followers), what="followers to drop")

        await client.delete(key)
        await eventually(lambda: all(f.current() not in (dropped, rotated) for f in followers),
                         what="a new secret after the deletion")
        assert followers[0].current() == followers[1].current()
        stored = await PeerSecretStore(client, cluster).ensure()
        assert stored == followers[0].current()
        tg.cancel_scope.cancel()


async def test_a_malformed_stored_secret_stops_a_starting_node(etcd_client):
    cluster = f"ps-{uuid.uuid4().hex[:8]}"
    await etcd_client.put(Keys(cluster).peer_secret(), b"{}")
    with pytest.raises(ConfigError, match="rotate-peer-secret --drop-old"):
        await PeerSecretStore(etcd_client, cluster).ensure()
    await PeerSecretStore(etcd_client, cluster).rotate(drop_old=True)
    assert await PeerSecretStore(etcd_client, cluster).ensure()
