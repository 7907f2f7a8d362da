"""The async etcd adapter against a real etcd, on trio and asyncio."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import grpc
import pytest
from pyetcd import etcdrpc

from cargohold.coordinator.embedded import choose_ports, etcd_command, spawn_etcd, stop_process
from cargohold.coordinator.etcd import (
    Compare,
    Delete,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    Get,
    LeaseLost,
    Put,
    WatchBatch,
    WatchEvent,
)
from tests.support.etcd import EtcdProcess
from tests.support.poll import PATIENCE, eventually


pytestmark = pytest.mark.anyio


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens: an etcd that is down."""
    return f"http://127.0.0.1:{choose_ports(None, 1)[0]}"


async def collect(watch, count: int, timeout: float = PATIENCE) -> list[WatchBatch]:
    """Batches from ``watch`` until ``count`` events arrived."""
    batches: list[WatchBatch] = []
    with anyio.fail_after(timeout):
        async for batch in watch:
            batches.append(batch)
            if sum(len(b.events) for b in batches) >= count:
                return batches
    raise AssertionError("watch ended")


def events_of(batches: list[WatchBatch]) -> list[WatchEvent]:
    return [event for batch in batches for event in batch.events]


# ------------------------------------------------------------------ key/value


async def test_put_get_delete(etcd_client, prefix):
    key = prefix + "ключ/1"  # keys are utf-8
    first = await etcd_client.put(key, b"one")
    second = await etcd_client.put(key, b"two")
    assert second > first

    kv = await etcd_client.get(key)
    assert kv is not None
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        key, b"two", first, second, 2, 0,
    )  # fmt: skip
    old = await etcd_client.get(key, revision=first)
    assert old is not None and old.value == b"one"
    assert await etcd_client.get(prefix + "missing") is None
    assert await etcd_client.current_revision() >= second

    await etcd_client.put(prefix + "ключ/2", b"")
    assert await etcd_client.delete(prefix + "nothing") == 0
    assert await etcd_client.delete(key) == 1
    assert await etcd_client.get(key) is None
    assert await etcd_client.delete(prefix, prefix=True) == 1
    assert (await etcd_client.get_prefix(prefix))[0] == []


async def test_get_prefix_limit_start_key_keys_only(etcd_client, prefix):
    for name in ["c", "a", "b", "d"]:
        await etcd_client.put(prefix + name, name.encode())
    await etcd_client.put(prefix[:-1] + "0", b"outside the prefix")

    kvs, revision, more = await etcd_client.get_prefix(prefix, limit=2)
    assert [kv.key for kv in kvs] == [prefix + "a", prefix + "b"] and more
    assert revision == await etcd_client.current_revision()

    kvs, _, more = await etcd_client.get_prefix(prefix, start_key=prefix + "b\0", keys_only=True)
    assert [(kv.key, kv.value) for kv in kvs] == [(prefix + "c", b""), (prefix + "d", b"")] and not more


async def test_iter_prefix_reads_one_revision(etcd_client, prefix):
    for i in range(25):
        await etcd_client.put(f"{prefix}{i:03d}", b"v1")

    pages = []
    async for page in etcd_client.iter_prefix(prefix, page_size=10):
        pages.append(page)
        # Writes between pages (updates, a delete, a new key) must not show.
        await etcd_client.put(f"{prefix}{len(pages) * 10 + 5:03d}", b"v2")
        await etcd_client.delete(f"{prefix}{len(pages) * 10 + 1:03d}")
        await etcd_client.put(f"{prefix}{len(pages) * 10 + 2:03d}x", b"new")

    assert all(0 < len(page) <= 10 for page in pages)
    kvs = [kv for page in pages for kv in page]
    assert [kv.key for kv in kvs] == [f"{prefix}{i:03d}" for i in range(25)]
    assert {kv.value for kv in kvs} == {b"v1"}

    keys = [kv.key async for page in etcd_client.iter_prefix(prefix, page_size=7, keys_only=True) for kv in page]
    assert keys == [kv.key for kv in (await etcd_client.get_prefix(prefix))[0]]
    assert len(keys) == 25 - 2 + 5


async def test_iter_prefix_bounds_each_read_to_about_a_page(etcd_client, prefix):
    """etcd 3.4 walks a range request's whole [key, range_end) whatever its limit: paging a big
    prefix with one fixed end walks n^2 / (2 * page) keys. The bounded reads must walk O(n)."""
    import hashlib
    names = []
    for i in range(600):           # shaped like the blob index: a record, copies and a link per digest
        d = "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()
        names += [f"blobs/{d}", f"blobs/{d}/at/n1", f"blobs/{d}/at/n2", f"blobs/{d}/in/app"]
    names += [f"manifests/team-{i % 7}/app/sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(300)]
    names += ["tags/\u00e9t\u00e9/v1", "z\xff\xff", "z\xff\xffa"]
    for i in range(0, len(names), 100):
        await etcd_client.txn([], [Put(prefix + name, b"v") for name in names[i:i + 100]])

    ranges = []
    real_range = etcd_client._range

    async def recording_range(request):
        ranges.append((request.key, request.range_end))
        return await real_range(request)

    etcd_client._range = recording_range
    try:
        pages = [page async for page in etcd_client.iter_prefix(prefix, page_size=50)]
    finally:
        del etcd_client._range

    keys = [kv.key for page in pages for kv in page]
    assert keys == sorted(prefix + name for name in names)      # every key once, in etcd's order
    assert all(0 < len(page) <= 50 for page in pages)
    stored = sorted(prefix.encode() + name.encode("utf-8", "surrogateescape") for name in names)
    walked = sum(sum(1 for k in stored if start <= k < end) for start, end in ranges)
    n = len(stored)
    assert walked < 4 * n, (walked, n, len(ranges))              # fixed-end paging walks ~n^2/100
    assert len(ranges) < 8 * n / 50                             # empty probes across gaps included


# ------------------------------------------------------------------ transactions


async def test_txn_success_and_failure(etcd_client, prefix):
    a, b = prefix + "a", prefix + "b"
    result = await etcd_client.txn(
        [Compare.missing(a)],
        [Put(a, b"1"), Put(b, b"2"), Get(prefix, prefix=True)],
        [Get(a)],
    )
    assert result.succeeded
    assert result.responses[:2] == [None, None]
    assert [(kv.key, kv.value) for kv in result.responses[2]] == [(a, b"1"), (b, b"2")]
    assert result.revision == (await etcd_client.get(a)).mod_revision

    # The same guard fails now; the failure branch's Get shows why.
    result = await etcd_client.txn([Compare.missing(a)], [Put(a, b"other")], [Get(a), Get(prefix + "zzz")])
    assert not result.succeeded
    assert [kv.value for kv in result.responses[0]] == [b"1"] and result.responses[1] == []
    assert (await etcd_client.get(a)).value == b"1"

    mod = (await etcd_client.get(a)).mod_revision
    result = await etcd_client.txn(
        [Compare.exists(a), Compare.value_equals(b, b"2"), Compare.mod_revision_equals(a, mod)],
        [Delete(prefix, prefix=True)],
    )
    assert result.succeeded and result.responses == [2]

    result = await etcd_client.txn([Compare.exists(a)], [Put(a, b"x")])
    assert not result.succeeded and result.responses == []
    assert await etcd_client.get(a) is None


# ------------------------------------------------------------------ leases


async def test_keep_alive_keeps_key_past_ttl(etcd_client, prefix):
    kept, unkept = await etcd_client.grant_lease(2), await etcd_client.grant_lease(2)
    await etcd_client.put(prefix + "kept", b"", lease=kept)
    await etcd_client.put(prefix + "unkept", b"", lease=unkept)
    async with anyio.create_task_group() as tg:
        tg.start_soon(etcd_client.keep_alive, kept, 2)
        # etcd's own clock expires the unrefreshed lease; by then the kept one is past its TTL too
        async def unkept_gone() -> bool:
            return await etcd_client.get(prefix + "unkept") is None
        await eventually(unkept_gone, what="the unrefreshed lease to expire")
        tg.cancel_scope.cancel()
    assert (await etcd_client.get(prefix + "kept")).lease == kept
    assert await etcd_client.get(prefix + "unkept") is None

    await etcd_client.revoke_lease(kept)
    assert await etcd_client.get(prefix + "kept") is None
    await etcd_client.revoke_lease(kept)  # revoking a gone lease is fine
    with pytest.raises(LeaseLost):
        await etcd_client.put(prefix + "late", b"", lease=kept)


async def test_keep_alive_raises_lease_lost_when_revoked_elsewhere(etcd_client, etcd):
    lease = await etcd_client.grant_lease(3)
    async with EtcdClient([etcd.url]) as other:
        refreshes = etcd_client.lease_refreshes
        with anyio.fail_after(PATIENCE):
            async with anyio.create_task_group() as tg:

                async def revoke_once_refreshing():
                    await eventually(lambda: etcd_client.lease_refreshes > refreshes, what="a refresh")
                    await other.revoke_lease(lease)

                tg.start_soon(revoke_once_refreshing)
                with pytest.raises(LeaseLost):
                    await etcd_client.keep_alive(lease, 3)


# ------------------------------------------------------------------ watches


async def test_watch_delivers_events_in_order(etcd_client, prefix):
    start = await etcd_client.current_revision() + 1
    await etcd_client.put(prefix + "a", b"1")  # before the watch is opened: still seen
    async with etcd_client.watch_prefix(prefix, start_revision=start) as watch:
        await etcd_client.put(prefix + "b", b"2")
        await etcd_client.put("/elsewhere/" + prefix, b"not watched")
        await etcd_client.txn([], [Put(prefix + "c", b"3"), Delete(prefix + "a")])
        await etcd_client.put(prefix + "a", b"4")
        batches = await collect(watch, 5)

    assert [(e.type, e.key.removeprefix(prefix), e.value) for e in events_of(batches)] == [
        ("put", "a", b"1"), ("put", "b", b"2"), ("put", "c", b"3"), ("delete", "a", b""), ("put", "a", b"4"),
    ]  # fmt: skip
    revisions = [e.mod_revision for e in events_of(batches)]
    assert revisions == sorted(revisions) and revisions[0] == start
    assert revisions[2] == revisions[3]  # one txn, one revision
    assert [b.revision for b in batches] == sorted({b.revision for b in batches})
    assert all(b.revision == b.events[-1].mod_revision for b in batches)


async def test_watch_from_now_and_consumer_cancellation_loses_nothing(etcd_client, prefix):
    async with etcd_client.watch_prefix(prefix, start_revision=0) as watch:
        with anyio.move_on_after(0.3):  # cancels a pending read: the stream is dropped
            await watch.__anext__()
        for i in range(4):
            await etcd_client.put(f"{prefix}{i}", b"")
        batches = await collect(watch, 4)
    assert [e.key for e in events_of(batches)] == [f"{prefix}{i}" for i in range(4)]


async def test_watch_of_compacted_revision_raises(etcd_client, etcd, prefix):
    first = await etcd_client.put(prefix + "k", b"1")
    last = await etcd_client.put(prefix + "k", b"2")

    def compact() -> None:
        with grpc.insecure_channel(etcd.url.removeprefix("http://")) as channel:
            etcdrpc.KVStub(channel).Compact(etcdrpc.CompactionRequest(revision=last, physical=True), timeout=5)

    await anyio.to_thread.run_sync(compact)
    async with etcd_client.watch_prefix(prefix, start_revision=first) as watch:
        with anyio.fail_after(PATIENCE), pytest.raises(EtcdCompacted) as info:
            await watch.__anext__()
        assert info.value.revision == last
        with pytest.raises(EtcdCompacted):  # stays failed
            await watch.__anext__()
    with pytest.raises(EtcdCompacted):
        await etcd_client.get(prefix + "k", revision=first)


async def test_watch_exit_releases_threads(etcd_client, prefix):
    async def one_watch() -> None:
        async with etcd_client.watch_prefix(prefix, start_revision=0) as watch:
            await etcd_client.put(prefix + "k", b"")
            await collect(watch, 1)

    await one_watch()       # warms up the threads that stay (anyio's worker pool, grpc's poller)
    baseline = threading.active_count()
    for _ in range(10):
        await one_watch()
    await eventually(lambda: threading.active_count() <= baseline + 1, what="the watches' threads to end")


async def test_watch_across_etcd_kill_and_restart_misses_nothing(tmp_path, prefix):
    proc = EtcdProcess(tmp_path / "etcd")
    await anyio.to_thread.run_sync(proc.start)
    try:
        async with EtcdClient([proc.url]) as client:
            start = await client.current_revision() + 1
            async with client.watch_prefix(prefix, start_revision=start) as watch:
                batches: list[WatchBatch] = []
                async with anyio.create_task_group() as tg:

                    async def consume() -> None:
                        batches.extend(await collect(watch, 10, timeout=30))

                    tg.start_soon(consume)
                    for i in range(5):
                        await client.put(f"{prefix}{i}", b"before")
                    await anyio.to_thread.run_sync(proc.kill)
                    await anyio.sleep(0.5)  # an outage that lasts (etcd's downtime, no outcome to await)
                    await anyio.to_thread.run_sync(proc.start)
                    for i in range(5, 10):
                        await client.put(f"{prefix}{i}", b"after")
        keys = [e.key for e in events_of(batches)]
        assert keys == [f"{prefix}{i}" for i in range(10)]
        revisions = [e.mod_revision for e in events_of(batches)]
        assert revisions == list(range(start, start + 10))
    finally:
        await anyio.to_thread.run_sync(proc.stop)


# ------------------------------------------------------------------ etcd down


async def test_get_while_etcd_down_is_cancellable(dead_url):
    async with EtcdClient([dead_url], retry_timeout=30) as client:
        before = anyio.current_time()
        with anyio.move_on_after(0.3):
            await client.get("k")
        # The bound is the behaviour: the cancel is honoured now, not after the 30 s of retries.
        assert anyio.current_time() - before < 10


async def test_unavailable_after_retry_timeout(dead_url):
    async with EtcdClient([dead_url, dead_url], retry_timeout=0.5) as client:
        for operation in (lambda: client.get("k"), lambda: client.put("k", b""), lambda: client.txn([], [Put("k", b"")])):
            before = anyio.current_time()
            with pytest.raises(EtcdUnavailable):
                await operation()
            # The bound is the behaviour: it gives up once retry_timeout is spent instead of hanging.
            assert 0.45 < anyio.current_time() - before < 10


async def test_round_trips_are_timed_without_the_backoff_between_retries(dead_url):
    async with EtcdClient([dead_url], retry_timeout=1.0) as client:
        before = anyio.current_time()
        with pytest.raises(EtcdUnavailable):
            await client.get("k")
        elapsed = anyio.current_time() - before
    assert client.requests >= 2 and client.requests == client.request_durations.cumulative()[-1][1]
    assert client.request_seconds < elapsed / 2     # refused at once; the rest was backoff


async def test_requests_fail_fast_once_etcd_counts_as_down(dead_url):
    async with EtcdClient([dead_url], retry_timeout=30, outage_after=0.5) as client:
        before = anyio.current_time()
        with pytest.raises(EtcdUnavailable):
            await client.get("k")
        first = anyio.current_time() - before
        refused = []
        for operation in (lambda: client.put("k", b""), lambda: client.txn([], [Put("k", b"")])):
            before = anyio.current_time()
            with pytest.raises(EtcdUnavailable):
                await operation()
            refused.append(anyio.current_time() - before)
        assert client.health.down and not client.health.reachable and client.health.outages == 1
    # The bounds are the behaviour: the first request gives up once etcd has not answered for
    # outage_after (not after the 30 s retry budget), and the next ones do not wait at all.
    assert 0.45 < first < 10
    assert max(refused) < 0.5, refused


async def test_requests_find_etcd_back_after_an_outage(tmp_path):
    proc = EtcdProcess(tmp_path / "etcd")
    await anyio.to_thread.run_sync(proc.start)
    try:
        async with EtcdClient([proc.url], outage_after=0.3) as client:
            await client.put("k", b"before")
            await anyio.to_thread.run_sync(proc.stop)
            with pytest.raises(EtcdUnavailable):
                await client.get("k")
            assert client.health.down and client.health.unreachable_for() > 0
            await anyio.to_thread.run_sync(proc.start)

            async def answered() -> bool:
                try:
                    return (await client.get("k")).value == b"before"
                except EtcdUnavailable:    # failed fast: no probe was due yet
                    return False

            await eventually(answered, interval=0.1, what="a request to find etcd back")
            assert client.health.reachable and client.health.unreachable_for() == 0
    finally:
        await anyio.to_thread.run_sync(proc.stop)


async def test_keep_alive_reports_lease_lost_when_etcd_stays_down(dead_url):
    async with EtcdClient([dead_url], retry_timeout=30) as client:
        # The bound is the behaviour: lost once the 2 s TTL has passed unrefreshed, not after the 30 s of retries.
        with anyio.fail_after(15), pytest.raises(LeaseLost):
            await client.keep_alive(1234, 2)


# ------------------------------------------------------------------ TLS


def make_certs(directory: Path) -> dict[str, str]:
    """A CA, and one certificate for 127.0.0.1 signed by it (etcd's server and our client)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=cargohold test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "host.key", "-out", "host.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "host.pem", "-days", "1", "-extfile", "ext")  # fmt: skip
    return {"ca": str(directory / "ca.pem"), "host": str(directory / "host.pem"), "key": str(directory / "host.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_mutual_tls(tmp_path):
    certs = await anyio.to_thread.run_sync(make_certs, tmp_path)
    client_port, peer_port = choose_ports(None)
    plain, tls = f"http://127.0.0.1:{client_port}", f"https://127.0.0.1:{client_port}"
    command = [arg.replace(plain, tls) for arg in etcd_command("etcd", tmp_path / "data", client_port, peer_port)]
    command += ["--cert-file", certs["host"], "--key-file", certs["key"],
                "--client-cert-auth", "--trusted-ca-file", certs["ca"]]  # fmt: skip
    proc = await anyio.to_thread.run_sync(spawn_etcd, command, tmp_path / "etcd.log")
    try:
        files = {"ca_file": certs["ca"], "cert_file": certs["host"], "key_file": certs["key"]}
        async with EtcdClient([tls], **files) as client:  # retries until etcd is up
            assert await client.put("k", b"v") > 1
        async with EtcdClient([f"127.0.0.1:{client_port}"], **files) as client:  # bare host:port + files: TLS
            assert (await client.get("k")).value == b"v"
        async with EtcdClient([tls], ca_file=certs["ca"], retry_timeout=0.3) as client:
            with pytest.raises(EtcdError):  # etcd wants a client certificate
                await client.get("k")
        # The admin commands speak TLS to etcd too.
        cli = [sys.executable, "-m", "cargohold", "gc", "status", "--json", "--etcd", tls,
               "--etcd-ca", certs["ca"], "--etcd-cert", certs["host"], "--etcd-key", certs["key"]]
        result = await anyio.to_thread.run_sync(lambda: subprocess.run(cli, capture_output=True, text=True,
                                                                       timeout=60))
        assert result.returncode == 0 and '"latest": null' in result.stdout, result.stderr
    finally:
        await anyio.to_thread.run_sync(stop_process, proc)


async def test_compare_none_with_prefix(etcd_client):
    from cargohold.coordinator.etcd import Compare, Put

    prefix = "/t/none-with-prefix/"
    guard = [Compare.none_with_prefix(prefix + "refs/")]
    assert (await etcd_client.txn(guard, [Put(prefix + "a", b"1")])).succeeded
    await etcd_client.put(prefix + "refs/x", b"")
    assert not (await etcd_client.txn(guard, [Put(prefix + "b", b"1")])).succeeded
    await etcd_client.delete(prefix + "refs/x")
    assert (await etcd_client.txn(guard, [Put(prefix + "c", b"1")])).succeeded
