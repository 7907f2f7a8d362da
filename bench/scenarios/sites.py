#!/usr/bin/env python3
"""cargohold sites benchmarks (issue 4, "Performance"): sites A and B on one etcd, loopback only.

    /work/venv/bin/python bench/sites.py [--only NAME[:VARIANT][,...]] [--quick] [--rounds N]
                                         [--json FILE] [--profile] [--keep | --workdir DIR]

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
timestamped as they arrive: nothing is polled. Every process is started and stopped here,
everything listens on 127.0.0.1, every wait has a deadline. Run by hand; see bench/SITES.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sites_harness as H  # noqa: E402

import anyio  # noqa: E402

MiB = H.MiB
MB = H.MB
THROUGHPUT_TARGET = 0.70
LAG_TARGET_P99 = 2.0


# --------------------------------------------------------------------------- results

@dataclass
class Row:
    benchmark: str
    metric: str
    value: float | str | None
    unit: str = ""
    target: str = "info"
    passed: bool | None = None      # None: information only
    note: str = ""
    error: str = ""

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        if self.passed is None:
            return "info"
        return "pass" if self.passed else "FAIL"


@dataclass
class Ctx:
    base: Path
    quick: bool
    profile: bool = False
    pyspy: str = "py-spy"
    rounds: int = 3
    profile_idle: bool = False
    keep: bool = False
    raw: dict = field(default_factory=dict)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit == "MB/s":
        return f"{v:,.0f} MB/s"
    if unit == "%":
        return f"{v:.1f} %"
    if unit == "s":
        return f"{v:.3f} s"
    if unit == "ms":
        return f"{v:,.0f} ms"
    return f"{v:,.2f} {unit}".rstrip()


def table(rows: list[Row]) -> str:
    head = ["benchmark", "metric", "value", "target", "result"]
    body = [[r.benchmark, r.metric, fmt(r.value, r.unit), r.target, r.verdict] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    notes = [f"- {r.benchmark} / {r.metric}: {r.note}" for r in rows if r.note]
    errs = [f"- {r.benchmark} / {r.metric}: ERROR {r.error}" for r in rows if r.error]
    return "\n".join([line(head), sep, *(line(b) for b in body), "", *notes, *errs])


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): the smallest value with at least p % at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


# --------------------------------------------------------------------------- helpers

def _new_sites(ctx: Ctx, label: str) -> H.Sites:
    name = f"bench-{label}-{uuid.uuid4().hex[:6]}"
    return H.Sites(ctx.base / name, name)


def _discard(ctx: Ctx, sites: H.Sites) -> None:
    """Remove a variant's data (GiBs of blobs) as soon as it is done, unless --keep; py-spy output stays."""
    if not ctx.keep:
        shutil.rmtree(sites.root, ignore_errors=True)


def _check_space(ctx: Ctx) -> None:
    need = (2 if ctx.quick else 4 + 4 * ctx.rounds) * (1 << 30)   # 2+2 nodes x replicas 2 x rounds GiB, + probes
    free = shutil.disk_usage(ctx.base).free
    if free < need:
        raise RuntimeError(f"{free / 2**30:.1f} GiB free under {ctx.base}; these benchmarks need about "
                           f"{need / 2**30:.0f} GiB (use --workdir elsewhere, or --rounds 1)")


def _quiet(w: H.Watcher, seconds: float, timeout: float) -> None:
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


def _profiler(ctx: Ctx, name: str) -> H.Profiler:
    return H.Profiler(ctx.pyspy, ctx.base / "profiles", name, enabled=ctx.profile, idle=ctx.profile_idle)


def _profile_report(ctx: Ctx, key: str, outputs: dict[str, str]) -> None:
    for label, path in outputs.items():
        summary = H.summarize_profile(path)
        ctx.raw.setdefault("profiles", {})[f"{key}/{label}"] = {"file": path, **summary}
        ctx.log(f"[profile] {key} {label}: {summary['samples']} samples ({summary['idle_share']:.0f} % waiting), "
                f"threads " + ", ".join(f"{t} {p:.0f} %" for t, p in summary["threads"][:4]))
        for name, share in summary["busy_leaves"][:8]:
            ctx.log(f"    busy {share:5.1f} %  {name}")
        for name, share in summary["cargohold_inclusive"][:8]:
            ctx.log(f"    incl {share:5.1f} %  {name}")
        if ctx.profile_idle:
            for name, share in summary["cargohold_where"][:10]:
                ctx.log(f"    wall {share:5.1f} %  {name}")


# --------------------------------------------------------------------------- 1. cross-site throughput

def cross_site_throughput(ctx: Ctx, *, nodes_per_site: int, replicas: int, mode: str) -> tuple[list[Row], dict]:
    """Push the layers at A, then let B replicate them; time B's part only. `ctx.rounds` rounds,
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
    a_ids = [f"a{i + 1}" for i in range(nodes_per_site)]
    b_ids = [f"b{i + 1}" for i in range(nodes_per_site)]
    a_set, b_set = set(a_ids), set(b_ids)
    watcher = None
    try:
        sites.start_etcd()
        for n in a_ids:
            sites.add(n, "A", {"replicas_per_site": replicas})
        for n in b_ids:
            sites.add(n, "B", {"replicas_per_site": replicas})
        sites.start(*a_ids)
        if mode == "rules":
            sites.start(*b_ids)
        watcher = H.Watcher(sites.etcd.url, sites.name).start(sites.nodes[a_ids[0]])
        a1 = sites.nodes[a_ids[0]]

        for rnd in range(1, ctx.rounds + 1):
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
                layer_digests = list(pool.map(lambda data: H.push_blob(c, a1.url, repo, data), layers))
                config_digest = H.push_blob(c, a1.url, repo, config)
                body = H.manifest_bytes((config_digest, len(config)), [(d, size) for d in layer_digests])
                manifest_digest = H.push_manifest(c, a1.url, repo, "v1", body)
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
            disk_before = H.fsync_write_speed(sites.root)
            os.sync()
            r["loadavg_before"] = os.getloadavg()[0]

            # -- the transfer into B
            prof = _profiler(ctx, f"{key}-r{rnd}")
            cpu0 = {n: H.cpu_seconds(sites.nodes[n].pid) for n in sites.nodes if sites.nodes[n].alive()}
            fetched0 = {n: H.scrape_metric(sites.nodes[n].url, "cargohold_replication_bytes_fetched") or 0
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
                cpu0.update({n: H.cpu_seconds(sites.nodes[n].pid) for n in b_ids})   # counted from ready
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
            outputs = prof.stop()
            cpu1 = {n: H.cpu_seconds(sites.nodes[n].pid) for n in cpu0}
            fetched = {n: (H.scrape_metric(sites.nodes[n].url, "cargohold_replication_bytes_fetched") or 0)
                       - (fetched0.get(n, 0) if mode == "rules" else 0) for n in b_ids}
            disk_after = H.fsync_write_speed(sites.root)
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
            if outputs:
                _profile_report(ctx, f"{key}-r{rnd}", outputs)

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
        raw["logs"] = {n: t for n, t in sites.log_tails(8).items() if t.strip() and t != "(no log)"}
        sites.stop()
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
        layer = H.random_blob(4096, f"{tag}-layer-{i}")
        cd, ld = H.digest_of(config), H.digest_of(layer)
        manifest = H.manifest_bytes((cd, len(config)), [(ld, len(layer))])
        out.append(Image(config, layer, manifest, cd, ld, H.digest_of(manifest)))
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
                    tg.start_soon(H.apush_blob, c, repo, img.config)
                    tg.start_soon(H.apush_blob, c, repo, img.layer)
                r["blobs_acked"] = time.monotonic()
                await H.apush_manifest(c, repo, f"t{i}", img.manifest)
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


def replication_lag(ctx: Ctx, *, nodes_per_site: int, replicas: int) -> tuple[list[Row], dict]:
    n_images = 30 if ctx.quick else 100
    rate = 10.0
    label = f"{nodes_per_site}+{nodes_per_site} nodes, replicas_per_site {replicas}"
    key = f"lag-{nodes_per_site}x{replicas}"
    raw: dict = {"nodes_per_site": nodes_per_site, "replicas_per_site": replicas, "images": n_images, "rate": rate}
    sites = _new_sites(ctx, f"lag{nodes_per_site}{replicas}")
    a_ids = [f"a{i + 1}" for i in range(nodes_per_site)]
    b_ids = [f"b{i + 1}" for i in range(nodes_per_site)]
    watcher = None
    prof = _profiler(ctx, key)
    try:
        sites.start_etcd()
        for n in a_ids:
            sites.add(n, "A", {"replicas_per_site": replicas})
        for n in b_ids:
            sites.add(n, "B", {"replicas_per_site": replicas})
        sites.start(*a_ids, *b_ids)
        watcher = H.Watcher(sites.etcd.url, sites.name).start(sites.nodes[a_ids[0]])
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
        cpu0 = {n: H.cpu_seconds(sites.nodes[n].pid) for n in sites.nodes}
        ctx.log(f"{key}: pushing {n_images} images at {rate:.0f}/s at {', '.join(a_ids)}")
        timings = anyio.run(_push_paced, urls, images, rate, "bench/lag")
        errors = [t["error"] for t in timings if "error" in t]
        if errors:
            raise RuntimeError(f"{len(errors)} pushes failed, first: {errors[0]}")
        watcher.wait_for(lambda: all(b_done(img.digest) for img in images), 120, "B to hold every manifest")
        profile_outputs = prof.stop()
        cpu1 = {n: H.cpu_seconds(sites.nodes[n].pid) for n in sites.nodes}

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
        if profile_outputs:
            _profile_report(ctx, key, profile_outputs)
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
        raw["logs"] = {n: t for n, t in sites.log_tails(8).items() if t.strip() and t != "(no log)"}
        sites.stop()
        _discard(ctx, sites)


# --------------------------------------------------------------------------- driver

def plan(quick: bool) -> dict[str, list[tuple[str, dict]]]:
    tp = [("1x1", {"nodes_per_site": 1, "replicas": 1, "mode": "restart"}),
          ("2x2-r1", {"nodes_per_site": 2, "replicas": 1, "mode": "restart"})]
    if not quick:
        tp += [("2x2-r2", {"nodes_per_site": 2, "replicas": 2, "mode": "restart"}),
               ("1x1-rules", {"nodes_per_site": 1, "replicas": 1, "mode": "rules"})]
    lag = [("1x1", {"nodes_per_site": 1, "replicas": 1})]
    if not quick:
        lag.append(("2x2-r2", {"nodes_per_site": 2, "replicas": 2}))
    return {"cross_site_throughput": [(v, kw) for v, kw in tp],
            "replication_lag": [(v, kw) for v, kw in lag]}


BENCHES = {"cross_site_throughput": cross_site_throughput, "replication_lag": replication_lag}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "nproc": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(), "kernel": platform.release(),
            "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma list of: " + ", ".join(BENCHES)
                    + "; a variant with NAME:VARIANT (e.g. cross_site_throughput:1x1)")
    ap.add_argument("--quick", action="store_true", help="4 x 16 MiB layers, 30 images, fewer variants")
    ap.add_argument("--json", help="write rows, raw measurements and machine info to this file")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per cross_site_throughput variant, median reported (default 3; --quick 1)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy record the nodes while B receives; summaries in the log and --json (--keep keeps the raw stacks)")
    ap.add_argument("--profile-idle", action="store_true",
                    help="with --profile: sample waiting threads too (wall-clock view: where each worker waits)")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--workdir", help="scratch directory (default: a new one under $TMPDIR)")
    args = ap.parse_args(argv)

    selected: list[tuple[str, str | None]] = []
    for item in [x.strip() for x in args.only.split(",") if x.strip()] or list(BENCHES):
        name, _, variant = item.partition(":")
        if name not in BENCHES:
            ap.error(f"unknown benchmark {name!r}")
        selected.append((name, variant or None))

    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cargohold-sites-"))
    base.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(base=base, quick=args.quick, profile=args.profile, pyspy=args.py_spy,
              rounds=args.rounds or (1 if args.quick else 3), profile_idle=args.profile_idle,
              keep=args.keep or bool(args.workdir))
    info = machine()
    ctx.log(f"sites benchmarks: {info['cpu']}, nproc {info['nproc']}, scratch {base}")
    rows: list[Row] = []
    full_plan = plan(args.quick)
    # variants named explicitly may come from the full plan even with --quick
    every = plan(False)
    try:
        for name, variant in selected:
            variants = full_plan[name] if variant is None else [v for v in every[name] if v[0] == variant]
            if not variants:
                ap.error(f"unknown variant {variant!r} of {name}: {[v for v, _ in every[name]]}")
            for vname, kw in variants:
                ctx.log(f"== {name} {vname}")
                try:
                    _check_space(ctx)
                    got, raw = BENCHES[name](ctx, **kw)
                    rows += got
                except Exception as exc:  # noqa: BLE001 - one benchmark's failure is a row, not a crash
                    traceback.print_exc()
                    raw = {"error": f"{type(exc).__name__}: {exc}"}
                    rows.append(Row(name, vname, None, error=raw["error"]))
                ctx.raw[f"{name}/{vname}"] = raw
    finally:
        print()
        print(table(rows), flush=True)
        info["loadavg_end"] = os.getloadavg()
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"machine": info, "quick": args.quick,
                                                   "rows": [asdict(r) | {"verdict": r.verdict} for r in rows],
                                                   "raw": ctx.raw}, indent=2, default=str))
            ctx.log(f"wrote {args.json}")
        if not args.keep and not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if rows and all(r.verdict in ("pass", "info") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
