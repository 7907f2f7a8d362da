"""Repro: paging through a large etcd prefix costs O(rest of the range) per page (etcd 3.4.23).

cargohold reads whole sections page by page with a fixed range end
(`EtcdClient.iter_prefix`: `limit=page`, the next page from the last key + "\\0"): the node's
start-up snapshot (`ClusterMetadata._load_snapshot`, pages of 2,000 over the whole cluster
prefix), the GC's mark snapshot (`GarbageCollector.snapshot`, pages of 1,000 over
`blobs/`, `manifests/`, `tags/`), and the CLI (`gc run --wait` and `gc status` load the
whole read model). etcd 3.4.23 collects *every* revision in [start, range_end) in its index
before applying the limit (the limit push-down, etcd-io/etcd#11990, was backported to 3.4 in
etcd-io/etcd#15137, after 3.4.23; even with it, etcd still walks the rest of the range to
count it). So a page costs in proportion to what is left after it and a full read is
quadratic; meanwhile the index lock is held, so writes (txns, lease-bound puts) wait.

This starts a private etcd on loopback, writes `--keys` keys shaped like cargohold's
`blobs/` section (a record, two `at/` and one `in/` key per digest), then measures:
1. reading the prefix the way cargohold does (one range end, `limit=page`), alone;
2. the same keys read as 16 bounded sub-ranges (`blobs/sha256:0` .. `blobs/sha256:f`);
   2b. the same keys through `EtcdClient.iter_prefix`, which bounds each read to about a page
   (since this repro; `--reads-only` stops here);
3. one small txn at a time: its latency alone, then while (1) runs again;
4. (1) after as many keys again were written into the range and deleted (their index
   entries stay until a compaction), then after a compaction.
--quick: 120,000 keys.
"""

from __future__ import annotations

import hashlib
import time

import anyio
import httpx

from bench.launch import Etcd
from bench.report import Row, log
from cargohold.coordinator.etcd import Delete, EtcdClient, Put

PREFIX = "/cargohold/repro/blobs/"


def keys(n: int) -> list[str]:
    out = []
    for i in range(n // 4):
        d = "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()
        out += [PREFIX + d, PREFIX + d + "/at/n1", PREFIX + d + "/at/n2", PREFIX + d + "/in/app"]
    return out


async def fill(client: EtcdClient, names: list[str]) -> None:
    batches = [names[i:i + 100] for i in range(0, len(names), 100)]

    async def worker(part) -> None:
        for batch in part:
            await client.txn([], [Put(k, b'{"size":1234,"created":1.0}') for k in batch])

    async with anyio.create_task_group() as tg:
        for w in range(16):
            tg.start_soon(worker, batches[w::16])


async def paged(client: EtcdClient, prefix: str, page: int, revision: int) -> tuple[int, list[float]]:
    start, n, times = None, 0, []
    while True:
        t = time.perf_counter()
        kvs, _, more = await client.get_prefix(prefix, revision=revision, limit=page, start_key=start)
        times.append(time.perf_counter() - t)
        n += len(kvs)
        if not more or not kvs:
            return n, times
        start = kvs[-1].key + "\0"


def compact(etcd_url: str, revision: int) -> None:
    """`etcdctl compact REV --physical`, through etcd's JSON gateway (no etcdctl needed)."""
    httpx.post(f"{etcd_url}/v3/kv/compaction", json={"revision": str(revision), "physical": True},
               timeout=300.0).raise_for_status()


async def measure(etcd_url: str, n_keys: int, page: int, reads_only: bool) -> dict:
    out: dict = {}
    async with EtcdClient([etcd_url], request_timeout=120.0) as client:
        names = keys(n_keys)
        t = time.perf_counter()
        await fill(client, names)
        out["write_s"] = time.perf_counter() - t
        log(f"wrote {len(names)} keys in {out['write_s']:.1f} s")
        rev = await client.current_revision()

        t = time.perf_counter()
        n, times = await paged(client, PREFIX, page, rev)
        total = out["one_range_end_s"] = time.perf_counter() - t
        out["pages_ms"] = {"first": times[0] * 1000, "middle": times[len(times) // 2] * 1000, "last": times[-1] * 1000}
        log(f"1. one range end, limit {page}: {n} keys, {len(times)} pages in {total:.1f} s; "
              f"first page {times[0] * 1000:.0f} ms, middle {times[len(times) // 2] * 1000:.0f} ms, "
              f"last {times[-1] * 1000:.0f} ms")

        t = time.perf_counter()
        n = 0
        for h in "0123456789abcdef":
            m, _ = await paged(client, PREFIX + "sha256:" + h, page, rev)
            n += m
        out["sub_ranges_s"] = time.perf_counter() - t
        log(f"2. 16 bounded sub-ranges, limit {page}: {n} keys in {out['sub_ranges_s']:.1f} s")

        t = time.perf_counter()
        reads = client.requests
        n = sum([len(kvs) async for kvs in client.iter_prefix(PREFIX, revision=rev, page_size=page)])
        out["iter_prefix_s"] = time.perf_counter() - t
        log(f"2b. EtcdClient.iter_prefix (each read bounded to about a page), limit {page}: {n} keys, "
              f"{client.requests - reads} reads in {time.perf_counter() - t:.1f} s")
        if reads_only:
            return out

        def stats(latencies: list[float]) -> str:
            latencies = sorted(latencies)
            p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
            return (f"{len(latencies)} txns, p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, "
                    f"max {latencies[-1] * 1000:.0f} ms")

        async def writer(latencies: list[float], done: anyio.Event) -> None:
            i = 0
            while not done.is_set():
                t0 = time.perf_counter()
                await client.txn([], [Put("/cargohold/repro/probe", str(i).encode())])
                latencies.append(time.perf_counter() - t0)
                i += 1

        alone: list[float] = []
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, alone, done)
            await anyio.sleep(5)
            done.set()
        out["txn_alone_p99_ms"] = sorted(alone)[min(len(alone) - 1, int(0.99 * len(alone)))] * 1000
        log(f"3a. one small txn at a time, nothing else running (5 s): {stats(alone)}")
        during: list[float] = []
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, during, done)
            t = time.perf_counter()
            await paged(client, PREFIX, page, rev)
            reading = time.perf_counter() - t
            done.set()
        out["txn_during_p99_ms"] = sorted(during)[min(len(during) - 1, int(0.99 * len(during)))] * 1000
        log(f"3b. the same during the paged read of (1) ({reading:.1f} s): {stats(during)}")

        # 4. Deleted keys stay in etcd's index until a compaction (cargohold's private
        #    etcd compacts hourly): a page still walks them.
        extra = [k + "/gone" for k in names[::2]]          # spread over the whole range
        await fill(client, extra)
        for i in range(0, len(extra), 100):
            await client.txn([], [Delete(k) for k in extra[i:i + 100]])
        rev = await client.current_revision()
        t = time.perf_counter()
        n, _ = await paged(client, PREFIX, page, rev)
        deleted = time.perf_counter() - t
        compact(etcd_url, rev)
        t = time.perf_counter()
        n, _ = await paged(client, PREFIX, page, rev)
        out["after_deletes_s"], out["after_compaction_s"] = deleted, time.perf_counter() - t
        log(f"4. after writing and deleting {len(extra)} more keys in the range: (1) takes "
              f"{deleted:.1f} s; after a compaction {time.perf_counter() - t:.1f} s ({n} keys)")
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--keys", type=int, help="keys in the range (default 480000; --quick 120000)")
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--reads-only", action="store_true", help="stop after the read comparisons (1, 2, 2b)")


def paged_range(ctx) -> list[Row]:
    n_keys = ctx.args.keys or (120_000 if ctx.quick else 480_000)
    etcd = Etcd(ctx.base / "etcd")
    etcd.start()
    try:
        r = ctx.details["paged_range"] = anyio.run(measure, etcd.url, n_keys, ctx.args.page, ctx.args.reads_only)
    finally:
        etcd.stop()
    b = "paged_range"
    rows = [Row(b, f"read {n_keys:,} keys, one range end, limit {ctx.args.page} (peer: 16 bounded sub-ranges)",
                r["one_range_end_s"], "s", peer=r["sub_ranges_s"],
                note="page ms first/middle/last: " + "/".join(f"{v:.0f}" for v in r["pages_ms"].values())),
            Row(b, "the same through EtcdClient.iter_prefix (peer: 16 bounded sub-ranges)", r["iter_prefix_s"], "s",
                peer=r["sub_ranges_s"])]
    if "txn_during_p99_ms" in r:
        rows += [Row(b, "small txn p99 during the read of (1) (peer: alone)", r["txn_during_p99_ms"], "ms",
                     peer=r["txn_alone_p99_ms"]),
                 Row(b, "(1) after as many keys written and deleted (peer: after a compaction)", r["after_deletes_s"],
                     "s", peer=r["after_compaction_s"])]
    return rows


PARTS = {"paged_range": paged_range}
