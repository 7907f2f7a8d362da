"""Sites (issue 4): cross-site replication throughput vs the disk, and replication lag.

    cross_site_throughput  1 GiB of layers (16 x 64 MiB; --quick 4 x 16 MiB) pushed at A while B is
                           down; B started; MB/s from B's registration until B holds every blob,
                           vs this machine's fsync'ed disk-write speed measured right before and
                           right after (target >= 70 %); median of N rounds (default 3). Variants:
                           1x1 (1+1 nodes, replicas_per_site 1), 2x2-r1 and 2x2-r2 (2+2 nodes,
                           replicas_per_site 1 and 2), 1x1-rules (B up, the transfer started by a
                           replication-rules change). --quick: 1x1 and 2x2-r1, one round.
    replication_lag        100 small images (config + 4 KiB layer + manifest; --quick 30) pushed
                           at A at 10 per second; for each, the time from the manifest PUT's 201
                           until B publishes its copy of the manifest (p50/p99/max; target p99 < 2 s).
                           Variants: 1x1 (replicas_per_site 1), 2x2-r2 (replicas_per_site 2;
                           not in --quick).

Arrival times come from an etcd watch on the cluster's prefix (`blobs/<d>/at/<node>` puts),
timestamped as they arrive: nothing is polled. See bench/SITES.md.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio
import httpx

from bench import metrics, oci, procs
from bench.disk import fsync_write_speed
from bench.launch import Cluster, EtcdWatch, Node, start_all
from bench.profiler import Profiler
from bench.report import Row, fmt, percentile

MiB = 1 << 20
MB = 1_000_000
GiB = 1 << 30
THROUGHPUT_TARGET = 0.70
LAG_TARGET_P99 = 2.0


def add_arguments(ap) -> None:
    ap.add_argument("--variant", action="append", default=[],
                    help="only these variants (repeat or comma list), e.g. 1x1; default: all of the size")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per cross_site_throughput variant, median reported (default 3; --quick 1)")
    ap.add_argument("--profile-idle", action="store_true",
                    help="with --profile: sample waiting threads too (wall-clock view: where each worker waits)")


def _rounds(ctx) -> int:
    return ctx.args.rounds or (1 if ctx.quick else 3)


@dataclass
class CopyEvent:
    t: float           # time.monotonic() when the watch received it
    kind: str          # "put" or "delete"
    digest: str
    node: str
    revision: int


class CopyWatch(EtcdWatch):
    """Follows `/cargohold/<cluster>/`: every `blobs/<d>/at/<node>` event (and member records,
    replication rules) timestamped as it arrives. Nothing is polled."""

    def __init__(self, etcd_url: str, cluster: str):
        super().__init__(etcd_url, f"/cargohold/{cluster}/")
        self.copies: list[CopyEvent] = []
        self.holders: dict[str, set[str]] = {}
        self.first_at: dict[tuple[str, str], float] = {}
        self.member_puts: dict[str, list[float]] = {}
        self.policy_put: list[tuple[float, int]] = []

    def apply(self, t: float, kind: str, key: str, revision: int) -> None:
        if key.startswith("blobs/"):
            digest, _, sub = key[len("blobs/"):].partition("/")
            rel, _, node = sub.partition("/")
            if rel == "at" and node:
                self._copy(CopyEvent(t, kind, digest, node, revision))
        elif key.startswith("members/") and kind == "put":
            self.member_puts.setdefault(key[len("members/"):], []).append(t)
        elif key.startswith("policies/replication") and kind == "put":
            self.policy_put.append((t, revision))

    def _copy(self, e: CopyEvent) -> None:
        self.copies.append(e)
        if e.kind == "put":
            self.holders.setdefault(e.digest, set()).add(e.node)
            self.first_at.setdefault((e.digest, e.node), e.t)
        else:
            self.holders.get(e.digest, set()).discard(e.node)

    def registered_since(self, node: str, since: float) -> float | None:
        """When `node` (re)wrote its member record at or after `since` (first such put)."""
        return next((t for t in self.member_puts.get(node, []) if t >= since), None)

    def count_in(self, digest: str, nodes: set[str]) -> int:
        return len(self.holders.get(digest, set()) & nodes)


class Sites(Cluster):
    """One etcd and nodes in sites A and B."""

    def define(self, nodes_per_site: int, replicas: int) -> tuple[list[str], list[str]]:
        """Start etcd and define (not start) a1.. in site A and b1.. in site B."""
        self.etcd.start()
        ids = {site: [f"{site.lower()}{i + 1}" for i in range(nodes_per_site)] for site in ("A", "B")}
        for site, names in ids.items():
            for n in names:
                self.node(n, {"site": site, "replicas_per_site": replicas})
        return ids["A"], ids["B"]

    def start(self, *node_ids: str) -> None:
        start_all([self.nodes[n] for n in node_ids])

    def replication_status(self) -> dict | None:
        try:
            return self.cli_json("replication", "status")
        except (RuntimeError, ValueError):
            return None

    def set_replication_rules(self, rules: list[dict]) -> None:
        path = self.workdir / f"rules-{time.monotonic_ns()}.yaml"
        path.write_text(json.dumps({"replication": rules}))
        r = self.cli("replication", "rules", "set", str(path))
        if r.returncode != 0:
            raise RuntimeError(f"replication rules set failed: {r.stderr.strip()}")

    def log_tails(self, lines: int = 8) -> dict[str, str]:
        return {n: t for n, node in self.nodes.items() if (t := node.log_tail(lines)).strip() and t != "(no log)"}


# --------------------------------------------------------------------------- helpers

def _new_sites(ctx, label: str) -> Sites:
    name = f"bench-{label}-{uuid.uuid4().hex[:6]}"
    return Sites(ctx.base / name, name)


def _discard(ctx, sites: Sites) -> None:
    """Remove a variant's data (GiBs of blobs) as soon as it is done, unless --keep."""
    if not ctx.args.keep:
        shutil.rmtree(sites.workdir, ignore_errors=True)


def _check_space(ctx) -> None:
    need = (2 if ctx.quick else 4 + 4 * _rounds(ctx)) * GiB   # 2+2 nodes x replicas 2 x rounds GiB, + probes
    free = shutil.disk_usage(ctx.base).free
    if free < need:
        raise RuntimeError(f"{free / GiB:.1f} GiB free under {ctx.base}; these benchmarks need about "
                           f"{need / GiB:.0f} GiB (use --workdir elsewhere, or --rounds 1)")


def _quiet(w: CopyWatch, seconds: float, timeout: float) -> None:
    """Wait until no copy event has arrived for `seconds` (placement inside a site settled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with w.cond:
            last = w.copies[-1].t if w.copies else 0.0
        if time.monotonic() - last >= seconds:
            return
        time.sleep(0.2)
    raise TimeoutError(f"copy events did not stop within {timeout:.0f}s")


def _status_summary(status: dict | None, site: str) -> dict:
    if status is None:
        return {"error": "replication status failed"}
    rules = [r for r in status.get("rules", []) if r["site"] == site]
    sites = [s for s in status.get("sites", []) if s["site"] == site]
    return {"pending": sum(r["pending"] for r in rules), "lag_seconds": max((r["lag_seconds"] for r in rules), default=0.0),
            "failed": sum(s["failed"] for s in sites),
            "failures": [f for s in sites for f in s.get("failures", [])][:5]}


def _profiler(ctx, name: str) -> Profiler:
    return Profiler(ctx.pyspy, ctx.profile_dir, name, mode="idle" if ctx.args.profile_idle else "oncpu").start()


def _fetched(node: Node) -> float:
    try:
        return metrics.value(node.samples(), metrics.BYTES_FETCHED)
    except httpx.HTTPError:
        return 0.0


# --------------------------------------------------------------------------- 1. cross-site throughput

def cross_site_throughput(ctx, *, nodes_per_site: int, replicas: int, mode: str) -> tuple[list[Row], dict]:
    """Push the layers at A, then let B replicate them; time B's part only. `_rounds(ctx)` rounds,
    each with new content, each with its own disk probes right before and right after it.

    mode "restart": B's nodes are down during the push (round 1: never started yet; later
    rounds: stopped with SIGTERM); the clock starts when the first B node (re)registers in etcd
    (its `members/<id>` put, seen by the watcher), before it answers /readyz, so start-up work
    that overlaps the transfer is counted against it.
    mode "rules": B's nodes are up; a replication rule keeps the round's repository in A during
    the push; the clock starts at the put of the rules that send it to B as well.
    """
    count, size = (4, 16 * MiB) if ctx.quick else (16, 64 * MiB)
    label = f"{nodes_per_site}+{nodes_per_site} nodes, replicas_per_site {replicas}" + (
        ", B up, rules switch" if mode == "rules" else "")
    key = f"throughput-{nodes_per_site}x{replicas}-{mode}"
    raw: dict = {"nodes_per_site": nodes_per_site, "replicas_per_site": replicas, "mode": mode,
                 "blobs": count, "blob_size": size, "rounds": []}
    sites = _new_sites(ctx, f"tp{nodes_per_site}{replicas}{mode[0]}")
    watcher = None
    try:
        a_ids, b_ids = sites.define(nodes_per_site, replicas)
        a_set, b_set = set(a_ids), set(b_ids)
        sites.start(*a_ids)
        if mode == "rules":
            sites.start(*b_ids)
        watcher = CopyWatch(sites.etcd.url, sites.name).start()
        a1 = sites.nodes[a_ids[0]]

        for rnd in range(1, _rounds(ctx) + 1):
            r: dict = {"round": rnd}
            raw["rounds"].append(r)
            repo = f"bench/r{rnd}"
            if mode == "restart" and rnd > 1:
                for n in b_ids:
                    sites.nodes[n].stop(timeout=20)
            if mode == "rules":
                sites.set_replication_rules([{"repositories": repo, "sites": ["A"]}])

            # -- content (untimed), then the push at A
            ctx.log(f"{key} round {rnd}: generating {count} x {size // MiB} MiB, pushing at {a_ids[0]}")
            layers = [os.urandom(size) for _ in range(count)]
            config = json.dumps({"architecture": "amd64", "os": "linux", "bench": key,
                                 "nonce": uuid.uuid4().hex}).encode()
            t0 = time.perf_counter()
            with httpx.Client(timeout=300) as c, ThreadPoolExecutor(2) as pool:
                layer_digests = list(pool.map(lambda data: oci.push_blob(c, repo, data, base=a1.url), layers))
                config_digest = oci.push_blob(c, repo, config, base=a1.url)
                body = oci.manifest_bytes((config_digest, len(config)), [(d, size) for d in layer_digests])
                manifest_digest = oci.push_manifest(c, repo, "v1", body, base=a1.url)
            r["push_mbps"] = count * size / (time.perf_counter() - t0) / MB
            sizes = {d: size for d in layer_digests}
            sizes[config_digest] = len(config)
            sizes[manifest_digest] = len(body)
            del layers

            # -- site A settles (its owners hold everything, extra copies dropped); flush the disk
            watcher.wait_for(lambda: all(watcher.count_in(d, a_set) >= replicas for d in sizes), 300,
                             "site A to hold its copies")
            _quiet(watcher, 3.0, 300)
            os.sync()

            # -- the disk, right before the transfer (same file system, 1 GiB, 8 MiB writes, fsync)
            disk_before = fsync_write_speed(sites.workdir, 1024 * MiB)
            os.sync()
            r["loadavg_before"] = os.getloadavg()[0]

            # -- the transfer into B
            prof = _profiler(ctx, f"{key}-r{rnd}")
            cpu0 = {n: procs.cpu_seconds(sites.nodes[n].pid) for n in sites.nodes if sites.nodes[n].alive()}
            fetched0 = {n: _fetched(sites.nodes[n])
                        for n in b_ids if sites.nodes[n].alive()}
            n_events_before = len(watcher.copies)
            for n in a_ids:
                prof.add(n, sites.nodes[n].pid)     # the senders
            if mode == "restart":
                t_spawn = time.monotonic()
                sites.start(*b_ids)
                t_ready = time.monotonic()
                watcher.wait_for(lambda: all(watcher.registered_since(b, t_spawn) for b in b_ids), 30,
                                 "B registration")
                t_start = min(watcher.registered_since(b, t_spawn) for b in b_ids)
                r["registered_after_spawn"] = t_start - t_spawn
                r["ready_after_registered"] = t_ready - t_start
                cpu0.update({n: procs.cpu_seconds(sites.nodes[n].pid) for n in b_ids})   # counted from ready
                for n in b_ids:
                    prof.add(n, sites.nodes[n].pid)
            else:
                for n in b_ids:
                    prof.add(n, sites.nodes[n].pid)
                n_policy = len(watcher.policy_put)
                sites.set_replication_rules([])         # no rule: every repository to every site
                watcher.wait_for(lambda: len(watcher.policy_put) > n_policy, 30, "the rules put")
                t_start = t_ready = watcher.policy_put[-1][0]
            watcher.wait_for(lambda: all(watcher.count_in(d, b_set) >= replicas for d in sizes), 600,
                             "site B to hold every blob")
            with watcher.cond:
                # per blob: when the replicas-th distinct B node first published its copy
                done_at, first = {}, {}
                for d in sizes:
                    times = sorted(watcher.first_at[(d, n)] for n in b_ids if (d, n) in watcher.first_at)
                    done_at[d], first[d] = times[replicas - 1], times[0]
                b_events = [e for e in watcher.copies[n_events_before:] if e.node in b_set]
            all_done = max(done_at.values())
            ctx.details.setdefault("profiles", {})[f"{key}-r{rnd}"] = prof.stop()
            cpu1 = {n: procs.cpu_seconds(sites.nodes[n].pid) for n in cpu0}
            fetched = {n: _fetched(sites.nodes[n])
                       - (fetched0.get(n, 0) if mode == "rules" else 0) for n in b_ids}
            disk_after = fsync_write_speed(sites.workdir, 1024 * MiB)
            r["loadavg_after"] = os.getloadavg()[0]

            copy_bytes = replicas * sum(sizes.values())
            elapsed = all_done - t_start
            mbps = copy_bytes / elapsed / MB
            disk = (disk_before + disk_after) / 2
            r.update({
                "seconds": elapsed, "seconds_from_ready": all_done - t_ready, "mbps": mbps,
                "mbps_from_ready": copy_bytes / max(all_done - t_ready, 1e-9) / MB,
                "first_copy_after_start": min(first.values()) - t_start,
                "arrivals": sorted((round(done_at[d] - t_start, 3), "manifest" if d == manifest_digest else
                                    "config" if d == config_digest else "layer") for d in done_at),
                # the design's order, per site: B's first copy of the manifest only once B holds every blob
                "manifest_after_blobs_in_b": first[manifest_digest] >= max(first[d] for d in sizes if d != manifest_digest),
                "copy_bytes": copy_bytes, "bytes_fetched": fetched,
                "extra_bytes_fetched": sum(fetched.values()) - copy_bytes,
                "b_copy_puts": sum(1 for e in b_events if e.kind == "put"),
                "b_copy_deletes": sum(1 for e in b_events if e.kind == "delete"),
                "cpu_seconds": {n: round(cpu1[n] - cpu0[n], 2) for n in cpu1},
                "disk_mbps_before": disk_before, "disk_mbps_after": disk_after, "disk_mbps": disk,
                "ratio": mbps / disk,
                "status_after": _status_summary(sites.replication_status(), "B"),
            })
            # CPU seconds per GB copied. With "restart", B's CPU is counted from /readyz (start-up
            # excluded), which misses the part of the transfer before it: None when that is over 10 %.
            gb = copy_bytes / 1e9
            counted = r["seconds_from_ready"] / elapsed if elapsed > 0 else 0.0
            r["b_cpu_per_gb"] = (sum(r["cpu_seconds"].get(n, 0) for n in b_ids) / gb) if counted >= 0.9 else None
            r["a_cpu_per_gb"] = sum(r["cpu_seconds"].get(n, 0) for n in a_ids) / gb
            ctx.log(f"{key} round {rnd}: {copy_bytes / MB:,.0f} MB in {elapsed:.2f}s = {mbps:,.0f} MB/s; disk "
                    f"{disk_before:,.0f} before / {disk_after:,.0f} after = {disk:,.0f} MB/s; ratio {mbps / disk:.0%};"
                    f" load {r['loadavg_before']:.1f}")

        rounds = raw["rounds"]
        mbps = statistics.median(x["mbps"] for x in rounds)
        ratio = statistics.median(x["ratio"] for x in rounds)
        disk = statistics.median(x["disk_mbps"] for x in rounds)
        raw.update({"mbps": mbps, "ratio": ratio, "disk_mbps": disk})
        last = rounds[-1]
        extra = statistics.median(x["extra_bytes_fetched"] for x in rounds)
        b_cpus = [x["b_cpu_per_gb"] for x in rounds if x["b_cpu_per_gb"] is not None]
        b_cpu = statistics.median(b_cpus) if b_cpus else None
        raw["b_cpu_per_gb"] = b_cpu
        per_round = "; ".join(f"r{x['round']} {x['mbps']:,.0f} MB/s vs disk {x['disk_mbps_before']:,.0f}/"
                              f"{x['disk_mbps_after']:,.0f} = {x['ratio']:.0%} (load {x['loadavg_before']:.1f})"
                              for x in rounds)
        note = (f"{last['copy_bytes'] / MB:,.0f} MB per round ({count} x {size // MiB} MiB layers + config + manifest,"
                f" x{replicas} copies in B), timed from "
                + ("B registering" if mode == "restart" else "the rules change")
                + f" to the last copy's `at/` put; median of {len(rounds)} rounds, each vs the mean of a disk probe "
                  f"right before and right after it: {per_round}; push at A median "
                  f"{statistics.median(x['push_mbps'] for x in rounds):,.0f} MB/s; CPU per GB copied (median): "
                  f"B {fmt(b_cpu, 's')}, A {statistics.median(x['a_cpu_per_gb'] for x in rounds):.2f} s"
                + (f"; B fetched {extra / MB:,.0f} MB more than it kept (median)" if extra > MiB else "")
                + f"; B pending after: {last['status_after'].get('pending')}"
                + f"; manifest before its blobs in B: {sum(not x['manifest_after_blobs_in_b'] for x in rounds)} rounds")
        rows = [
            Row("cross_site_throughput", f"{label}: MB/s into B", mbps, "MB/s", "info", None),
            Row("cross_site_throughput", f"{label}: fsync'ed disk write", disk, "MB/s", "info", None),
            Row("cross_site_throughput", f"{label}: B CPU per GB", b_cpu, "s", "info", None),
            Row("cross_site_throughput", f"{label}: vs disk", 100 * ratio, "%",
                f">= {THROUGHPUT_TARGET:.0%}", ratio >= THROUGHPUT_TARGET, note),
        ]
        return rows, raw
    finally:
        if watcher is not None:
            watcher.stop()
        raw["logs"] = sites.log_tails()
        sites.close()
        _discard(ctx, sites)


# --------------------------------------------------------------------------- 2. replication lag

@dataclass
class Image:
    config: bytes
    layer: bytes
    manifest: bytes
    config_digest: str
    layer_digest: str
    digest: str


def _images(n: int, tag: str) -> list[Image]:
    out = []
    for i in range(n):
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"},
                             "bench": tag, "i": i}).encode()
        layer = oci.random_bytes(4096, f"{tag}-layer-{i}")
        cd, ld = oci.digest_of(config), oci.digest_of(layer)
        manifest = oci.manifest_bytes((cd, len(config)), [(ld, len(layer))])
        out.append(Image(config, layer, manifest, cd, ld, oci.digest_of(manifest)))
    return out


async def _push_paced(urls: list[str], images: list[Image], rate: float, repo: str) -> list[dict]:
    """Push image i starting at t0 + i / rate (each in its own task, so a slow push does not delay
    the next one's start); round-robin over `urls`. Returns per-image timings (time.monotonic)."""
    results: list[dict] = [{} for _ in images]
    clients = [httpx.AsyncClient(base_url=u, timeout=60, limits=httpx.Limits(max_connections=64)) for u in urls]
    try:
        async def one(i: int, img: Image) -> None:
            c = clients[i % len(clients)]
            r = results[i]
            r["start"] = time.monotonic()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(oci.apush_blob, c, repo, img.config)
                    tg.start_soon(oci.apush_blob, c, repo, img.layer)
                r["blobs_acked"] = time.monotonic()
                await oci.apush_manifest(c, repo, f"t{i}", img.manifest)
                r["acked"] = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - recorded, reported as an error
                r["error"] = f"{type(exc).__name__}: {exc}"

        async with anyio.create_task_group() as tg:
            t0 = time.monotonic()
            for i, img in enumerate(images):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, i, img)
    finally:
        for c in clients:
            await c.aclose()
    return results


def replication_lag(ctx, *, nodes_per_site: int, replicas: int) -> tuple[list[Row], dict]:
    n_images = 30 if ctx.quick else 100
    rate = 10.0
    label = f"{nodes_per_site}+{nodes_per_site} nodes, replicas_per_site {replicas}"
    key = f"lag-{nodes_per_site}x{replicas}"
    raw: dict = {"nodes_per_site": nodes_per_site, "replicas_per_site": replicas, "images": n_images, "rate": rate}
    sites = _new_sites(ctx, f"lag{nodes_per_site}{replicas}")
    watcher = None
    prof = _profiler(ctx, key)
    try:
        a_ids, b_ids = sites.define(nodes_per_site, replicas)
        sites.start(*a_ids, *b_ids)
        watcher = CopyWatch(sites.etcd.url, sites.name).start()
        b_set = set(b_ids)
        urls = [sites.nodes[n].url for n in a_ids]
        tag = uuid.uuid4().hex[:8]

        def b_done(d: str) -> bool:
            return watcher.count_in(d, b_set) >= replicas

        # warm-up (not measured): one image end to end, so connections and channels exist
        warm = _images(1, f"warm-{tag}")
        anyio.run(_push_paced, urls, warm, rate, "bench/warm")
        watcher.wait_for(lambda: b_done(warm[0].digest), 60, "the warm-up image in B")

        images = _images(n_images, tag)
        for n in b_ids:
            prof.add(n, sites.nodes[n].pid)
        cpu0 = {n: procs.cpu_seconds(sites.nodes[n].pid) for n in sites.nodes}
        ctx.log(f"{key}: pushing {n_images} images at {rate:.0f}/s at {', '.join(a_ids)}")
        timings = anyio.run(_push_paced, urls, images, rate, "bench/lag")
        errors = [t["error"] for t in timings if "error" in t]
        if errors:
            raise RuntimeError(f"{len(errors)} pushes failed, first: {errors[0]}")
        watcher.wait_for(lambda: all(b_done(img.digest) for img in images), 120, "B to hold every manifest")
        ctx.details.setdefault("profiles", {})[key] = prof.stop()
        cpu1 = {n: procs.cpu_seconds(sites.nodes[n].pid) for n in sites.nodes}

        def arrival(d: str) -> float:
            times = sorted(watcher.first_at[(d, n)] for n in b_ids if (d, n) in watcher.first_at)
            return times[replicas - 1]

        lags, blob_lags, push_lat, order_violations = [], [], [], 0
        with watcher.cond:
            for img, t in zip(images, timings):
                m_at = arrival(img.digest)
                lags.append(m_at - t["acked"])
                blob_lags.append(max(arrival(img.config_digest), arrival(img.layer_digest)) - t["blobs_acked"])
                push_lat.append(t["acked"] - t["start"])
                # the design's order: in B, no node publishes the manifest before B holds its blobs
                first_m = min(watcher.first_at[(img.digest, n)] for n in b_ids if (img.digest, n) in watcher.first_at)
                first_blobs = max(min(watcher.first_at[(d, n)] for n in b_ids if (d, n) in watcher.first_at)
                                  for d in (img.config_digest, img.layer_digest))
                if first_m < first_blobs:
                    order_violations += 1
        span = timings[-1]["start"] - timings[0]["start"]
        raw.update({
            "lag_seconds": lags, "blob_lag_seconds": blob_lags, "push_seconds": push_lat,
            "push_rate_achieved": (len(images) - 1) / span if span > 0 else None,
            "order_violations": order_violations,
            "cpu_seconds": {n: round(cpu1[n] - cpu0[n], 2) for n in cpu1},
            "status_after": _status_summary(sites.replication_status(), "B"),
        })
        p50, p99, worst = percentile(lags, 50), percentile(lags, 99), max(lags)
        raw.update({"p50": p50, "p99": p99, "max": worst, "mean": statistics.fmean(lags)})
        first10 = statistics.median(lags[:10])
        last10 = statistics.median(lags[-10:])
        ctx.log(f"{key}: manifest lag p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms;"
                f" blob lag p50 {percentile(blob_lags, 50) * 1000:.0f} ms; push p50 {percentile(push_lat, 50) * 1000:.0f} ms")
        note = (f"{n_images} images at {raw['push_rate_achieved']:.1f}/s over {', '.join(a_ids)}; from the manifest "
                f"PUT's 201 to the {'last B copy' if replicas > 1 else 'B copy'}'s `at/` put; blobs (config + layer) reached B "
                f"p50 {percentile(blob_lags, 50) * 1000:.0f} ms / p99 {percentile(blob_lags, 99) * 1000:.0f} ms after "
                f"their 201s; push (3 requests) p50 {percentile(push_lat, 50) * 1000:.0f} ms / p99 "
                f"{percentile(push_lat, 99) * 1000:.0f} ms; median lag of the first 10 {first10 * 1000:.0f} ms, "
                f"last 10 {last10 * 1000:.0f} ms; manifests before their blobs in B: {order_violations}; "
                f"B CPU " + ", ".join(f"{n} {raw['cpu_seconds'][n]:.1f}s" for n in b_ids)
                + f"; B pending after: {raw['status_after'].get('pending')}")
        rows = [
            Row("replication_lag", f"{label}: p50", p50 * 1000, "ms", "info", None),
            Row("replication_lag", f"{label}: p99", p99 * 1000, "ms", f"< {LAG_TARGET_P99 * 1000:.0f} ms",
                p99 < LAG_TARGET_P99, note),
            Row("replication_lag", f"{label}: max", worst * 1000, "ms", "info", None),
        ]
        return rows, raw
    finally:
        prof.stop()
        if watcher is not None:
            watcher.stop()
        raw["logs"] = sites.log_tails()
        sites.close()
        _discard(ctx, sites)


# --------------------------------------------------------------------------- driver

THROUGHPUT = {"1x1": {"nodes_per_site": 1, "replicas": 1, "mode": "restart"},
              "2x2-r1": {"nodes_per_site": 2, "replicas": 1, "mode": "restart"},
              "2x2-r2": {"nodes_per_site": 2, "replicas": 2, "mode": "restart"},
              "1x1-rules": {"nodes_per_site": 1, "replicas": 1, "mode": "rules"}}
LAG = {"1x1": {"nodes_per_site": 1, "replicas": 1}, "2x2-r2": {"nodes_per_site": 2, "replicas": 2}}
QUICK = {"1x1", "2x2-r1"}


def _variants(ctx, name: str, bench, table: dict) -> list[Row]:
    wanted = [v for o in ctx.args.variant for v in o.split(",") if v]
    names = [v for v in table if v in wanted] if wanted else [v for v in table if not ctx.quick or v in QUICK]
    rows: list[Row] = []
    for variant in names:
        ctx.log(f"== {name} {variant}")
        try:
            _check_space(ctx)
            got, raw = bench(ctx, **table[variant])
            rows += got
        except Exception as exc:  # noqa: BLE001 - one variant's failure is a row, not a crash
            traceback.print_exc()
            raw = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append(Row(name, variant, None, error=raw["error"]))
        ctx.details[f"{name}/{variant}"] = raw
    return rows


PARTS = {
    "cross_site_throughput": lambda ctx: _variants(ctx, "cross_site_throughput", cross_site_throughput, THROUGHPUT),
    "replication_lag": lambda ctx: _variants(ctx, "replication_lag", replication_lag, LAG),
}
