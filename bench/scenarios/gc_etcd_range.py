"""Repro: paging through a large etcd prefix costs O(rest of the range) per page (etcd 3.4.23).

    /work/venv/bin/python bench/gc_etcd_range.py [--keys 480000] [--page 1000]

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
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cargohold.coordinator.etcd import Delete, EtcdClient, Put  # noqa: E402
from tests.support.etcd import EtcdProcess  # noqa: E402

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


async def main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="etcd-range-repro-") as tmp:
        etcd = EtcdProcess(Path(tmp))
        etcd.start()
        try:
            async with EtcdClient([etcd.url], request_timeout=120.0) as client:
                names = keys(args.keys)
                t = time.perf_counter()
                await fill(client, names)
                print(f"wrote {len(names)} keys in {time.perf_counter() - t:.1f} s")
                rev = await client.current_revision()

                t = time.perf_counter()
                n, times = await paged(client, PREFIX, args.page, rev)
                total = time.perf_counter() - t
                print(f"1. one range end, limit {args.page}: {n} keys, {len(times)} pages in {total:.1f} s; "
                      f"first page {times[0] * 1000:.0f} ms, middle {times[len(times) // 2] * 1000:.0f} ms, "
                      f"last {times[-1] * 1000:.0f} ms")

                t = time.perf_counter()
                n = 0
                for h in "0123456789abcdef":
                    m, _ = await paged(client, PREFIX + "sha256:" + h, args.page, rev)
                    n += m
                print(f"2. 16 bounded sub-ranges, limit {args.page}: {n} keys in {time.perf_counter() - t:.1f} s")

                t = time.perf_counter()
                reads = client.requests
                n = sum([len(kvs) async for kvs in client.iter_prefix(PREFIX, revision=rev, page_size=args.page)])
                print(f"2b. EtcdClient.iter_prefix (each read bounded to about a page), limit {args.page}: {n} keys, "
                      f"{client.requests - reads} reads in {time.perf_counter() - t:.1f} s")
                if args.reads_only:
                    return

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
                print(f"3a. one small txn at a time, nothing else running (5 s): {stats(alone)}")
                during: list[float] = []
                done = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer, during, done)
                    t = time.perf_counter()
                    await paged(client, PREFIX, args.page, rev)
                    reading = time.perf_counter() - t
                    done.set()
                print(f"3b. the same during the paged read of (1) ({reading:.1f} s): {stats(during)}")

                # 4. Deleted keys stay in etcd's index until a compaction (cargohold's private
                #    etcd compacts hourly): a page still walks them.
                extra = [k + "/gone" for k in names[::2]]          # spread over the whole range
                await fill(client, extra)
                for i in range(0, len(extra), 100):
                    await client.txn([], [Delete(k) for k in extra[i:i + 100]])
                rev = await client.current_revision()
                t = time.perf_counter()
                n, _ = await paged(client, PREFIX, args.page, rev)
                deleted = time.perf_counter() - t
                compacted = subprocess.run(["etcdctl", "--endpoints", etcd.url, "compact", str(rev), "--physical", "--command-timeout", "300s"],
                               check=False, capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"})
                if compacted.returncode != 0:
                    raise RuntimeError(f"etcdctl compact: {compacted.stdout} {compacted.stderr}")
                t = time.perf_counter()
                n, _ = await paged(client, PREFIX, args.page, rev)
                print(f"4. after writing and deleting {len(extra)} more keys in the range: (1) takes "
                      f"{deleted:.1f} s; after a compaction {time.perf_counter() - t:.1f} s ({n} keys)")
        finally:
            etcd.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="etcd 3.4 paged-range cost repro")
    parser.add_argument("--keys", type=int, default=480000)
    parser.add_argument("--page", type=int, default=1000)
    parser.add_argument("--reads-only", action="store_true", help="stop after the read comparisons (1, 2, 2b)")
    anyio.run(main, parser.parse_args())
