"""Group commit against a real etcd: concurrent guarded writes share transactions, and every
write still gets the answer its own guard gives."""

from __future__ import annotations

import anyio
import pytest

from cargohold.coordinator.etcd import Compare, Delete, Put
from cargohold.coordinator.groupcommit import GroupCommit
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


async def test_concurrent_writes_share_transactions(etcd_client, prefix):
    group = GroupCommit(etcd_client, max_ops=16)
    await etcd_client.put(prefix + "blob", b"")
    results = {}

    async def publish(i: int) -> None:
        results[i] = await group.submit([Compare.exists(prefix + "blob")], [Put(f"{prefix}at/{i:03d}", b"")])

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(publish, i)

    assert all(r.succeeded for r in results.values()) and len(results) == 200
    kvs, _, _ = await etcd_client.get_prefix(prefix + "at/")
    assert [kv.key for kv in kvs] == [f"{prefix}at/{i:03d}" for i in range(200)]
    assert group.writes == 200
    assert group.transactions <= 200 // 8 + 2, group.transactions      # 16 ops a txn: 16 writes each
    # Each write's revision is the one its transaction applied at.
    assert {r.revision for r in results.values()} == {kv.mod_revision for kv in kvs}


async def test_a_failing_guard_fails_only_its_own_write(etcd_client, prefix):
    group = GroupCommit(etcd_client)
    for i in range(20):
        if i != 7:
            await etcd_client.put(f"{prefix}blob/{i}", b"")
    results = {}

    async def publish(i: int) -> None:
        results[i] = await group.submit([Compare.exists(f"{prefix}blob/{i}")], [Put(f"{prefix}at/{i:02d}", b"")])

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(publish, i)

    assert [i for i, r in results.items() if not r.succeeded] == [7]
    kvs, _, _ = await etcd_client.get_prefix(prefix + "at/")
    assert [kv.key for kv in kvs] == [f"{prefix}at/{i:02d}" for i in range(20) if i != 7]


async def test_writes_guarding_each_other_never_share_a_transaction(etcd_client, prefix):
    """Two copies of a blob, each withdrawn only while the other stands: at most one may go.
    In one transaction both guards would hold and both copies would be gone."""
    group = GroupCommit(etcd_client)
    for _ in range(20):
        a, b = prefix + "at/a", prefix + "at/b"
        await etcd_client.put(a, b"")
        await etcd_client.put(b, b"")
        outcomes = []

        async def withdraw(mine: str, other: str) -> None:
            outcomes.append((await group.submit([Compare.exists(other)], [Delete(mine)])).succeeded)

        async with anyio.create_task_group() as tg:
            tg.start_soon(withdraw, a, b)
            tg.start_soon(withdraw, b, a)
            tg.start_soon(withdraw, prefix + "unrelated", a)   # keeps a round in flight to batch behind

        assert outcomes.count(True) >= 1
        kvs, _, _ = await etcd_client.get_prefix(prefix + "at/")
        assert len(kvs) == 1, [kv.key for kv in kvs]


async def test_writes_to_one_key_go_in_separate_transactions(etcd_client, prefix):
    group = GroupCommit(etcd_client)
    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(group.submit, [], [Put(prefix + "same", str(i).encode())])
            tg.start_soon(group.submit, [], [Delete(prefix + "dir/", prefix=True)])
            tg.start_soon(group.submit, [], [Put(f"{prefix}dir/{i}", b"")])
    assert group.transactions < 30


async def in_flight(group: GroupCommit) -> None:
    # checked at every checkpoint (interval 0): the commit is in flight only for a moment
    await eventually(lambda: group._committing, interval=0, what="a commit in flight")


async def test_a_write_cancelled_while_queued_is_not_sent(etcd_client, prefix):
    group = GroupCommit(etcd_client)
    async with anyio.create_task_group() as tg:
        tg.start_soon(group.submit, [], [Put(prefix + "first", b"")])
        await in_flight(group)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await group.submit([], [Put(prefix + "cancelled", b"")])
    with anyio.CancelScope() as scope:     # the committer itself is cancelled mid-flight:
        async with anyio.create_task_group() as tg:
            tg.start_soon(group.submit, [], [Put(prefix + "a", b"")])
            await in_flight(group)
            tg.start_soon(group.submit, [], [Put(prefix + "b", b"")])
            await anyio.sleep(0)
            tg.cancel_scope.cancel()
    # ... and the queue is left in order: the next writes go through.
    assert (await group.submit([], [Put(prefix + "after", b"")])).succeeded
    assert await etcd_client.get(prefix + "first") is not None
    assert await etcd_client.get(prefix + "cancelled") is None
    assert await etcd_client.get(prefix + "after") is not None
