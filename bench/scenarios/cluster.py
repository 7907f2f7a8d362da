"""Cluster (issue 3): aggregate pull 1 vs 3 nodes, rebalance on join, etcd round trips per request.

    aggregate_pull     24 different 32 MiB blobs pulled by 24 parallel curl clients,
                       1 node vs 3 nodes (replicas 2); the ratio, and the share served remotely
    rebalance_join     3 nodes, N blobs; a 4th node joins: bytes moved vs the ideal 1/4 of the
                       copy-bytes, and transfer MB/s vs this disk's fsync'ed write speed
    etcd_round_trips   etcd requests per blob upload and per manifest PUT, counted by the nodes'
                       /metrics and by etcd's own gRPC counters, on 1 and 3 nodes

--quick: 24 x 8 MiB pull blobs, 1 round; 60 x 256 KiB rebalance blobs and a 256 MiB disk test;
K = 20. See bench/CLUSTER.md.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench import metrics, oci, procs
from bench.disk import blob_pattern_speed, device_write_speed, fsync_write_speed
from bench.launch import Cluster, EtcdWatch
from bench.profiler import Profiler
from bench.report import Row

MiB = 1 << 20
MB = 1_000_000
SETTLE_POLL = 0.2        # seconds between placement polls (the nodes' /metrics) in rebalance_join
SETTINGS = {"replicas_per_site": 2}


def add_arguments(ap) -> None:
    ap.add_argument("--rebalance-blobs", type=int, metavar="N",
                    help="rebalance_join: number of blobs (default 200 x 1 MiB; --quick 60 x 256 KiB)")
    ap.add_argument("--rebalance-size", type=float, metavar="MIB",
                    help="rebalance_join: size of each blob in MiB (default 1; --quick 0.25)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra node setting for every cluster (YAML value), e.g. replication_workers=16")


def prepare(ctx) -> None:
    import yaml
    ctx.settings = dict(SETTINGS)
    for item in ctx.args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, not {item!r}")
        ctx.settings[key.strip()] = yaml.safe_load(value)
    ctx.details["node_settings"] = ctx.settings


def write_blob_file(path: Path, size: int, seed: str) -> str:
    data = oci.random_bytes(size, seed)
    path.write_bytes(data)
    return oci.digest_of(data)


# --------------------------------------------------------------------------- placement helpers

def owners_fn():
    """cargohold's own rendezvous rule, imported read-only from the benchmarked tree."""
    from cargohold.replication.placement import owners
    return owners


def placement_settled(holders: dict[str, set[str]], digests: set[str], members: list[str],
                      replicas: int, owners) -> tuple[bool, str]:
    for d in digests:
        got = holders.get(d, set())
        want = set(owners(d, members, replicas))
        if got != want:
            return False, f"{d[:19]} on {sorted(got)}, owners {sorted(want)}"
    return True, ""


def wait_placement(cl: Cluster, digests: set[str], members: list[str], replicas: int, timeout: float,
                   interval: float = SETTLE_POLL) -> tuple[float, dict[str, set[str]]]:
    """Poll etcd until every digest is held by exactly its rendezvous owners."""
    owners = owners_fn()
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        holders, _ = cl.holders()
        ok, last = placement_settled(holders, digests, members, replicas, owners)
        if ok:
            return time.monotonic() - t0, holders
        time.sleep(interval)
    raise TimeoutError(f"placement not settled after {timeout:.0f}s: {last}")


def _quiet_now(cl: Cluster, c: httpx.Client, copies: int | None, held: dict[str, int] | None) -> str:
    """Why replication is not idle right now ("" when it is), from /metrics only."""
    rev = cl.etcd.revision()
    total = 0
    for nid, n in cl.nodes.items():
        s = n.samples(c)
        model = int(metrics.value(s, metrics.READ_MODEL_REVISION))
        queue = metrics.value(s, metrics.QUEUE_DEPTH)
        mine = int(metrics.value(s, metrics.BLOBS_HELD))
        total += mine
        if model != rev or queue:
            return f"{nid}: model rev {model} vs etcd {rev}, queue {queue}"
        if held is not None and held.get(nid, 0) != mine:
            return f"{nid} holds {mine} blobs, want {held.get(nid, 0)}"
    return f"{total} copies held, want {copies}" if copies is not None and total != copies else ""


def wait_quiet(cl: Cluster, timeout: float, *, copies: int | None = None, held: dict[str, int] | None = None,
               stable: float = 0.5, interval: float = 0.05) -> float:
    """Wait until replication is idle: every node's read model is at etcd's revision, no node has
    queued work, (optionally) the nodes hold `copies` copies in all and each node exactly
    `held[node]` blobs, and this stays so for `stable` seconds. Returns the seconds waited."""
    t0 = time.monotonic()
    quiet_since = None
    last = ""
    with httpx.Client(timeout=10.0) as c:
        while time.monotonic() - t0 < timeout:
            last = _quiet_now(cl, c, copies, held)
            if last:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= stable:
                return time.monotonic() - t0
            time.sleep(interval)
    raise TimeoutError(f"cluster not quiet after {timeout:.0f}s ({last})")


def profiled(ctx, cl: Cluster, name: str) -> Profiler:
    """py-spy of every node of the cluster while the block runs (with --profile)."""
    prof = Profiler(ctx.pyspy, ctx.profile_dir, name, mode="idle")
    for nid, node in cl.nodes.items():
        if node.alive():
            prof.add(nid, node.pid)
    return prof


# =========================================================================== aggregate_pull

def bench_aggregate_pull(ctx) -> list[Row]:
    n_blobs = 24
    size = (8 if ctx.quick else 32) * MiB
    rounds = 1 if ctx.quick else 5
    clients = 24
    content = ctx.base / "pull-content"
    content.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    files = []
    for i in range(n_blobs):
        p = content / f"blob{i}"
        files.append((p, write_blob_file(p, size, f"pull-{i}-{size}")))
    ctx.log(f"[aggregate_pull] {n_blobs} x {size // MiB} MiB blobs generated in {time.perf_counter() - t0:.1f}s; "
            f"{clients} curl clients x {rounds} round(s)")
    results = {}
    for n_nodes in (1, 3):
        results[n_nodes] = _pull_cluster(ctx, n_nodes, files, size, clients, rounds)
    raw = ctx.details["aggregate_pull"] = {"blob_size": size, "blobs": n_blobs, "clients": clients,
                                       "rounds": rounds, "runs": results}
    one, three = results[1], results[3]
    ratio = three["MBps"] / one["MBps"]
    raw["ratio"] = ratio
    return [
        Row("aggregate_pull", f"1 node, {clients} clients, {n_blobs} x {size // MiB} MiB x {rounds} rounds",
            one["MBps"], "MB/s", note=_cpu_note(one)),
        Row("aggregate_pull", f"3 nodes (replicas 2), {clients} clients", three["MBps"], "MB/s",
            note=_cpu_note(three)),
        Row("aggregate_pull", "ratio 3 nodes / 1 node", ratio, "x", "report (2 cores: overhead, not scale)",
            note=f"{os.cpu_count()} cpus shared by all nodes and the 24 curl clients"),
        Row("aggregate_pull", "pulls served remotely (3 nodes)", 100 * three["remote_share"], "%",
            note=f"{three['remote_pulls']}/{three['pulls']} pulls hit a node without a copy (from placement in "
                 f"etcd x the round-robin plan; per-node GET counts in /metrics "
                 f"{'match' if three['metrics_match_plan'] else 'DO NOT match'} the plan); mean time per pull "
                 f"under this load: local {_s(three['mean_transfer_s']['local'])}, remote "
                 f"{_s(three['mean_transfer_s']['remote'])} (1 node: {_s(one['mean_transfer_s']['local'])})"),
    ]


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def _cpu_note(r: dict) -> str:
    gb = r["bytes"] / 1e9
    return (f"{r['bytes'] / MB:,.0f} MB in {r['seconds']:.2f}s; CPU: nodes {r['node_cpu_s']:.2f}s "
            f"({r['node_cpu_s'] / gb:.2f} s/GB), curl {r['curl_cpu_s']:.2f}s; "
            f"{100 * (r['node_cpu_s'] + r['curl_cpu_s']) / (r['seconds'] * (os.cpu_count() or 1)):.0f}% of "
            f"{os.cpu_count()} cpus")


def _pull_cluster(ctx, n_nodes: int, files, size: int, clients: int, rounds: int) -> dict:
    repo = "bench/pull"
    wd = Path(tempfile.mkdtemp(prefix=f"pull{n_nodes}-", dir=ctx.base))
    with Cluster(wd, f"pull{n_nodes}", ctx.settings) as cl:
        for i in range(n_nodes):
            cl.add(f"n{i + 1}")
        urls = [n.url for n in cl.nodes.values()]
        ids = list(cl.nodes)
        t0 = time.perf_counter()
        with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as c:
            def push(i):
                p, d = files[i]
                oci.push_blob_file_monolithic(c, repo, p, d, base=urls[i % n_nodes])
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(push, range(len(files))))
        ctx.log(f"[aggregate_pull] {n_nodes} node(s): pushed {len(files)} blobs in {time.perf_counter() - t0:.1f}s")
        digests = {d for _, d in files}
        replicas = min(2, n_nodes)
        settle_s, holders = wait_placement(cl, digests, ids, replicas, timeout=600)
        wait_quiet(cl, 120, copies=replicas * len(files))
        ctx.log(f"[aggregate_pull] {n_nodes} node(s): every blob on its {replicas} owner(s) "
                f"{settle_s:.1f}s after the last push")

        # The plan: client i talks to node i % n (round-robin), and pulls blob (i + r) % 24 in round r.
        plan = [[(i % n_nodes, (i + r) % len(files)) for r in range(rounds)] for i in range(clients)]

        # Untimed: every (node, blob) pair of the plan read once with httpx and its sha256 checked
        # (this checks remote reads too, and puts every node in the same page-cache state).
        pairs = sorted({pair for client in plan for pair in client})
        t0 = time.perf_counter()

        def verify(pair):
            ni, bi = pair
            h = hashlib.sha256()
            n = 0
            with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as c2:
                with c2.stream("GET", f"{urls[ni]}/v2/{repo}/blobs/{files[bi][1]}") as r:
                    r.raise_for_status()
                    for chunk in r.iter_raw(1 * MiB):
                        h.update(chunk)
                        n += len(chunk)
            if "sha256:" + h.hexdigest() != files[bi][1] or n != size:
                raise RuntimeError(f"node {ids[ni]} served wrong content for blob {bi}")
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(verify, pairs))
        ctx.log(f"[aggregate_pull] {n_nodes} node(s): {len(pairs)} (node, blob) pairs verified by sha256 "
                f"in {time.perf_counter() - t0:.1f}s (untimed)")

        before = cl.samples()
        cpu0 = {nid: procs.cpu_seconds(n.pid) for nid, n in cl.nodes.items()}
        ccpu0 = procs.children_cpu()
        curls = []
        t0 = time.perf_counter()
        for client in plan:
            cmd = ["curl", "-s", "-S", "--max-time", "600", "-w", "%{http_code} %{size_download} %{time_total}\\n"]
            for ni, bi in client:
                cmd += ["-o", "/dev/null", f"{urls[ni]}/v2/{repo}/blobs/{files[bi][1]}"]
            curls.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=900) for p in curls]
        wall = time.perf_counter() - t0
        ccpu = procs.children_cpu() - ccpu0
        node_cpu = {nid: procs.cpu_seconds(n.pid) - cpu0[nid] for nid, n in cl.nodes.items()}
        after = cl.samples()
        total = 0
        times = {"local": [], "remote": []}
        for client, p, (out, err) in zip(plan, curls, outs):
            words = out.split()
            if p.returncode != 0 or len(words) != 3 * rounds:
                raise RuntimeError(f"curl exited {p.returncode}: {err.strip()[:300]} / {out[:200]}")
            for (ni, bi), code, got, secs in zip(client, words[::3], words[1::3], words[2::3]):
                if code != "200" or int(got) != size:
                    raise RuntimeError(f"curl got HTTP {code}, {got} bytes (want 200, {size})")
                total += int(got)
                times["remote" if ids[ni] not in holders[files[bi][1]] else "local"].append(float(secs))
        pulls = clients * rounds
        remote = sum(1 for client in plan for ni, bi in client if ids[ni] not in holders[files[bi][1]])
        planned_per_node = {nid: sum(1 for client in plan for ni, _ in client if ids[ni] == nid) for nid in ids}
        got_per_node = {nid: int(metrics.value(after[nid], metrics.HTTP_REQUESTS, route="blob", method="GET",
                                        status="200")
                                 - metrics.value(before[nid], metrics.HTTP_REQUESTS, route="blob", method="GET",
                                          status="200")) for nid in ids}
        sent = {nid: int(metrics.value(after[nid], metrics.HTTP_BYTES_SENT)
                         - metrics.value(before[nid], metrics.HTTP_BYTES_SENT)) for nid in ids}
        res = {"nodes": n_nodes, "seconds": wall, "bytes": total, "MBps": total / wall / MB,
               "pulls": pulls, "remote_pulls": remote, "remote_share": remote / pulls,
               "planned_gets_per_node": planned_per_node, "metrics_gets_per_node": got_per_node,
               "metrics_match_plan": planned_per_node == got_per_node, "bytes_sent_per_node": sent,
               "node_cpu_s": sum(node_cpu.values()), "node_cpu_per_node": node_cpu, "curl_cpu_s": ccpu,
               "placement_settle_s": settle_s,
               "mean_transfer_s": {k: (sum(v) / len(v) if v else None) for k, v in times.items()},
               "held": {nid: int(metrics.value(after[nid], metrics.BLOBS_HELD)) for nid in ids}}
        ctx.log(f"[aggregate_pull] {n_nodes} node(s): {total / MB:,.0f} MB in {wall:.2f}s = "
                f"{res['MBps']:,.0f} MB/s; remote pulls {remote}/{pulls}; node CPU "
                f"{res['node_cpu_s']:.1f}s, curl CPU {ccpu:.1f}s; GETs per node {got_per_node}")
    shutil.rmtree(wd, ignore_errors=True)
    return res


# =========================================================================== rebalance_join

class PlacementPoller(threading.Thread):
    """Every SETTLE_POLL s, reads every node's /metrics (no etcd request: the counts come from
    each node's read model). When the joining node holds its rendezvous share, the nodes hold
    2 copies per blob in all and no node has queued work, one keys-only Range on etcd confirms
    that every blob is on exactly its owners; the poll that saw it is the settle time.
    (Polling etcd itself every 0.2 s was tried first: a Range over ~3,200 keys costs etcd ~25 ms
    of CPU, enough to disturb what is measured on 2 cores.)"""

    def __init__(self, cl: Cluster, digests: set[str], members: list[str], newcomer: str, replicas: int):
        super().__init__(daemon=True)
        self.cl, self.digests, self.members, self.newcomer, self.replicas = cl, digests, members, newcomer, replicas
        self.owners = owners_fn()
        self.expected_newcomer = sum(1 for d in digests if newcomer in self.owners(d, members, replicas))
        self.first_copy_at: float | None = None
        self.settled_at: float | None = None
        self.holders: dict[str, set[str]] = {}
        self.polls = 0
        self.confirmations = 0
        self.last = ""
        self.error: BaseException | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=5.0) as c:
                while not self.stop_flag.is_set():
                    now = time.monotonic()
                    self.polls += 1
                    held, queued = {}, 0.0
                    for nid, node in list(self.cl.nodes.items()):
                        try:
                            s = node.samples(c)
                        except (httpx.HTTPError, RuntimeError):
                            continue            # not listening yet
                        held[nid] = int(metrics.value(s, metrics.BLOBS_HELD))
                        queued += metrics.value(s, metrics.QUEUE_DEPTH)
                    mine = held.get(self.newcomer, 0)
                    if self.first_copy_at is None and mine > 0:
                        self.first_copy_at = now
                    self.last = f"{self.newcomer} holds {mine}/{self.expected_newcomer}, copies {sum(held.values())}"
                    if (mine == self.expected_newcomer and sum(held.values()) == self.replicas * len(self.digests)
                            and not queued):
                        self.confirmations += 1
                        holders, _ = self.cl.holders()
                        ok, why = placement_settled(holders, self.digests, self.members, self.replicas, self.owners)
                        if ok:
                            self.settled_at, self.holders = now, holders
                            return
                        self.last = why
                    self.stop_flag.wait(max(0.0, SETTLE_POLL - (time.monotonic() - now)))
        except BaseException as e:  # noqa: BLE001
            self.error = e


def bench_rebalance_join(ctx) -> list[Row]:
    n_blobs, size = (60, 256 * 1024) if ctx.quick else (200, 1 * MiB)
    n_blobs = ctx.args.rebalance_blobs or n_blobs
    size = int(ctx.args.rebalance_size * MiB) if ctx.args.rebalance_size else size
    disk_total = (256 if ctx.quick else 512) * MiB
    repo = "bench/rebalance"
    wd = Path(tempfile.mkdtemp(prefix="rebalance-", dir=ctx.base))
    raw = ctx.details["rebalance_join"] = {"blobs": n_blobs, "blob_size": size, "poll_interval_s": SETTLE_POLL}
    disk_runs = [fsync_write_speed(wd, disk_total) for _ in range(2)]
    ctx.log(f"[rebalance_join] disk: {disk_total // MiB} MiB in 8 MiB writes + fsync: "
            + ", ".join(f"{x:,.0f}" for x in disk_runs) + " MB/s")
    owners = owners_fn()
    with Cluster(wd, "rebalance", ctx.settings) as cl:
        for i in range(3):
            cl.add(f"n{i + 1}")
        urls = [n.url for n in cl.nodes.values()]
        blobs = [oci.random_bytes(size, f"rebalance-{i}-{size}") for i in range(n_blobs)]
        digests = [oci.digest_of(b) for b in blobs]
        t0 = time.perf_counter()
        with httpx.Client(timeout=60.0) as c:
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(lambda i: oci.push_blob(c, repo, blobs[i], digests[i], base=urls[i % 3]), range(n_blobs)))
        blobs.clear()        # free the memory
        three = ["n1", "n2", "n3"]
        settle_s, holders_before = wait_placement(cl, set(digests), three, 2, timeout=300)
        wait_quiet(cl, 120, copies=2 * n_blobs)
        ctx.log(f"[rebalance_join] {n_blobs} x {size // 1024} KiB pushed round-robin in "
                f"{time.perf_counter() - t0:.1f}s, on their 2 owners {settle_s:.1f}s later")
        list_before = cl.cli_json("node", "list")
        fetched_before = {nid: metrics.value(s, metrics.BYTES_FETCHED) for nid, s in cl.samples().items()}

        cpu_before = {nid: procs.cpu_seconds(node.pid) for nid, node in cl.nodes.items()}
        cpu_before["etcd"] = procs.cpu_seconds(cl.etcd.pid)
        machine_before = procs.machine_cpu()
        four = three + ["n4"]
        poller = PlacementPoller(cl, set(digests), four, "n4", 2)
        node4 = cl.node("n4")
        with EtcdWatch(cl.etcd.url, cl.prefix) as watch, profiled(ctx, cl, "rebalance_join") as prof:
            starting = threading.Thread(target=node4.start, daemon=True)
            t_spawn = time.monotonic()
            starting.start()
            poller.start()
            while node4.pid is None and starting.is_alive():
                time.sleep(0.005)
            prof.add("n4", node4.pid)
            starting.join(120)
            t_ready = time.monotonic() if node4.alive() and not starting.is_alive() else None
            if t_ready is None:
                raise RuntimeError(f"n4 did not start:\n{node4.log_tail()}")
            poller.join(600)
            poller.stop_flag.set()
            if poller.settled_at is not None:
                time.sleep(0.5)     # let the last watch events arrive
        if watch.error:
            raise watch.error
        if poller.error:
            raise poller.error
        if poller.settled_at is None:
            raise TimeoutError(f"placement with n4 not settled after 600s: {poller.last}")
        # CPU over the join (spawn -> settled + 0.5 s): where the 2 cores went
        cpu_join = {nid: procs.cpu_seconds(node.pid) - cpu_before.get(nid, 0.0) for nid, node in cl.nodes.items()}
        cpu_join["etcd"] = procs.cpu_seconds(cl.etcd.pid) - cpu_before["etcd"]
        busy, idle = (a - b for a, b in zip(procs.machine_cpu(), machine_before))
        wait_quiet(cl, 120, copies=2 * n_blobs)
        samples = cl.samples()
        fetched = {nid: int(metrics.value(s, metrics.BYTES_FETCHED) - fetched_before.get(nid, 0))
                   for nid, s in samples.items()}
        n4_etcd = (int(metrics.value(samples["n4"], metrics.ETCD_REQUESTS)),
                   metrics.value(samples["n4"], metrics.ETCD_REQUEST_SECONDS))
        n4_cpu = procs.cpu_seconds(node4.pid)
        list_after = cl.cli_json("node", "list")
        holders_after, _ = cl.holders()

    moved = sum(fetched.values())
    total_copy_bytes = 2 * n_blobs * size
    ideal = total_copy_bytes / 4
    # what rendezvous hashing actually hands the new node: the blobs whose owner set gained n4
    must_move = [d for d in digests if "n4" in owners(d, four, 2)]
    necessary = len(must_move) * size
    unexpected = {d: sorted(holders_after[d] - holders_before[d] - {"n4"}) for d in digests
                  if holders_after[d] - holders_before[d] - {"n4"}}
    needless = [d for d in digests if set(owners(d, four, 2)) == set(owners(d, three, 2))
                and holders_after[d] != holders_before[d]]
    window_ready = poller.settled_at - t_ready
    window_spawn = poller.settled_at - t_spawn
    window_first = poller.settled_at - poller.first_copy_at if poller.first_copy_at else None
    rate = moved / window_ready / MB if window_ready > 0 else float("inf")
    # the same transfer as etcd saw it, timestamped by a watch (no polling latency)
    tl = _timeline(watch.events, "n4")
    fetch_window = (tl["last_n4_copy"] - tl["registered"]) if tl["last_n4_copy"] and tl["registered"] else None
    rate_watch = moved / fetch_window / MB if fetch_window else None
    disk_runs.append(fsync_write_speed(ctx.base, disk_total))
    disk = sorted(disk_runs)[len(disk_runs) // 2]
    device = device_write_speed(ctx.base, 4 * disk_total)
    workers = int(cl.settings.get("replication_workers", 4))
    pattern = blob_pattern_speed(ctx.base, min(n_blobs, 400), size, workers)
    n4_row = next(r for r in list_after if r["id"] == "n4")
    raw.update({
        "disk_MBps_runs": disk_runs, "disk_MBps_used": disk, "blob_pattern_MBps": pattern,
        "device_MBps_o_direct": device,
        "bytes_fetched_delta": fetched, "moved": moved, "ideal": ideal, "necessary": necessary,
        "blobs_to_n4": len(must_move), "unexpected_copies": unexpected, "needless_moves": needless,
        "t_ready_after_spawn": t_ready - t_spawn,
        "t_first_copy_after_spawn": (poller.first_copy_at - t_spawn) if poller.first_copy_at else None,
        "t_settled_after_spawn": window_spawn, "window_ready_s": window_ready, "window_first_copy_s": window_first,
        "n4_etcd_requests": n4_etcd[0], "n4_etcd_mean_ms": 1000 * n4_etcd[1] / max(n4_etcd[0], 1),
        "n4_cpu_s_total": n4_cpu, "node_settings": cl.settings, "cpu_s_join": cpu_join,
        "machine_busy_share_join": busy / (busy + idle) if busy + idle else None,
        "polls": poller.polls, "rate_MBps": rate, "rate_watch_MBps": rate_watch,
        "timeline_after_spawn": {k: (v - t_spawn if v else None) for k, v in tl.items()}, "node_list_before": list_before, "node_list_after": list_after,
    })
    ctx.log(f"[rebalance_join] n4 ready {t_ready - t_spawn:.2f}s after spawn; first copy "
            f"{(poller.first_copy_at - t_spawn) if poller.first_copy_at else float('nan'):.2f}s; settled "
            f"{window_spawn:.2f}s after spawn ({poller.polls} polls of /metrics every {SETTLE_POLL}s, "
            f"{poller.confirmations} confirmed in etcd)")
    ctx.log(f"[rebalance_join] n4: {n4_etcd[0]} etcd requests, mean {1000 * n4_etcd[1] / max(n4_etcd[0], 1):.1f} ms; "
            f"CPU {n4_cpu:.1f}s since spawn (startup included)")
    ctx.log("[rebalance_join] CPU-s over the join: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu_join.items())
            + f"; the machine's CPUs were {100 * busy / max(busy + idle, 1e-9):.0f}% busy (all tenants)")
    ctx.log(f"[rebalance_join] fetched per node {fetched}; moved {moved / MiB:.1f} MiB, ideal {ideal / MiB:.1f} MiB, "
            f"rendezvous share {necessary / MiB:.1f} MiB ({len(must_move)} blobs)")
    ctx.log("[rebalance_join] node list before: " + ", ".join(f"{r['id']} {r['blobs']} blobs {r['bytes'] / MiB:.0f} MiB"
                                                              for r in list_before))
    ctx.log("[rebalance_join] node list after:  " + ", ".join(f"{r['id']} {r['blobs']} blobs {r['bytes'] / MiB:.0f} MiB"
                                                              for r in list_after))
    dev = moved / ideal - 1
    rows = [
        Row("rebalance_join", "bytes moved / ideal (1/4 of copy-bytes)", moved / ideal, "x", "within 10% (0.90-1.10)",
            abs(dev) <= 0.10,
            note=f"{moved / MiB:.1f} MiB moved (n4 fetched {fetched.get('n4', 0) / MiB:.1f} MiB, others "
                 f"{(moved - fetched.get('n4', 0)) / MiB:.1f} MiB) vs ideal {ideal / MiB:.1f} MiB; n4 ends with "
                 f"{n4_row['blobs']} blobs = {100 * n4_row['bytes'] / total_copy_bytes:.1f}% of the copy-bytes"),
        Row("rebalance_join", "bytes moved / rendezvous share of n4", moved / necessary if necessary else None, "x",
            "1.00 (only blobs whose owners changed move)",
            moved == necessary and not unexpected and not needless,
            note=f"{len(must_move)} of {n_blobs} blobs gained n4 as owner; copies made elsewhere: {len(unexpected)}; "
                 f"blobs moved whose owners did not change: {len(needless)}"),
        Row("rebalance_join", "transfer rate (n4 ready -> settled)", rate, "MB/s", "info",
            note=f"{moved / MB:.1f} MB in {window_ready:.2f}s; settle seen by polling the nodes' /metrics every {SETTLE_POLL}s "
                 f"(adds up to ~{SETTLE_POLL}s); from spawn {window_spawn:.2f}s, n4 ready after "
                 f"{t_ready - t_spawn:.2f}s"),
        Row("rebalance_join", "transfer rate (n4 registered -> its last copy published)", rate_watch, "MB/s", "info",
            note="timestamps from an etcd watch (no polling): n4's member record at "
                 f"{_ms(tl['registered'], t_spawn)}, first copy {_ms(tl['first_n4_copy'], t_spawn)}, last copy "
                 f"{_ms(tl['last_n4_copy'], t_spawn)}, last old copy withdrawn {_ms(tl['last_drop'], t_spawn)} "
                 f"after spawn; ready {_ms(t_ready, t_spawn)}; poll saw settled {_ms(poller.settled_at, t_spawn)}"),
        Row("rebalance_join", "fsync'ed disk write speed (same run)", disk, "MB/s", "info",
            note=f"{disk_total // MiB} MiB in 8 MiB writes + one fsync, 3 times (2 before the join, 1 after): "
                 + ", ".join(f"{x:,.0f}" for x in disk_runs) + " MB/s; the median is used"),
        Row("rebalance_join", f"disk, the store's pattern ({size // 1024} KiB files, fsync, rename, dir fsync, "
                              f"{workers} writers)", pattern, "MB/s", "info",
            note="what the disk allows for blob-sized fetches with as many writers as replication workers"),
        Row("rebalance_join", "transfer rate / disk write speed", rate / disk, "x", ">= 0.70", rate / disk >= 0.70),
        Row("rebalance_join", "device write speed (O_DIRECT, fsync)", device, "MB/s", "info",
            note=f"{4 * disk_total // MiB} MiB from one reused aligned 8 MiB buffer, after the join: the disk "
                 "without the page cache (cargohold stages fetched blobs this way)"),
        Row("rebalance_join", "transfer rate / device write speed", rate / device if device else None, "x", "info",
            note="the same transfer against the device's own speed"),
    ]
    shutil.rmtree(wd, ignore_errors=True)
    return rows


def _ms(t: float | None, t0: float) -> str:
    return "-" if t is None else f"{t - t0:.2f}s"


def _timeline(events, newcomer: str) -> dict:
    tl = {"registered": None, "alive": None, "first_n4_copy": None, "last_n4_copy": None, "last_drop": None}
    for t, kind, key, _rev in events:
        if key == f"members/{newcomer}" and tl["registered"] is None:
            tl["registered"] = t
        elif key == f"alive/{newcomer}" and tl["alive"] is None:
            tl["alive"] = t
        elif key.startswith("blobs/") and "/at/" in key:
            if kind == "put" and key.endswith(f"/at/{newcomer}"):
                tl["first_n4_copy"] = tl["first_n4_copy"] or t
                tl["last_n4_copy"] = t
            elif kind == "delete":
                tl["last_drop"] = t
    return tl


# =========================================================================== etcd_round_trips

RT_PHASES = (
    # name, label, target text, limit per request
    ("blob", "blob upload (monolithic POST ?digest=)", "<= 2", 2),
    ("blob_docker", "blob upload, docker flow (HEAD 404, POST, PATCH, PUT)", "<= 2", 2),
    ("manifest", "manifest PUT", "= 1", 1),
)


STATUS_SETTLE = 2.5     # s: longer than the nodes' 2 s status-report interval


def bench_etcd_round_trips(ctx) -> list[Row]:
    k = 20 if ctx.quick else 50
    size = 64 * 1024
    rows: list[Row] = []
    raw = ctx.details["etcd_round_trips"] = {"K": k, "blob_size": size, "runs": {}}
    for n_nodes in (1, 3):
        res = raw["runs"][n_nodes] = _round_trips(ctx, n_nodes, k, size)
        for phase, label, target, limit in RT_PHASES:
            p = res[phase]
            node_max, node_min = max(p["node_per_request"]), min(p["node_per_request"])
            srv = p["server"]
            note = (f"receiving node's /metrics per request (without its withdraw txn when it is not an owner): "
                    f"min {node_min}, max {node_max}; over the phase, its "
                    f"replication work included: {p['node_total'] / k:.2f}/op; all nodes' /metrics "
                    f"{p['cluster_total'] / k:.2f}/op; etcd's own counters per op: Txn {srv['Txn'] / k:.2f}, "
                    f"Range {srv['Range'] / k:.2f}, Put {srv['Put'] / k:.2f}, DeleteRange {srv['DeleteRange'] / k:.2f}")
            if n_nodes == 1:
                # one node, one client: etcd's count is exactly this node's requests for this request
                per = p["server_per_request"]
                value, vmin, vmax = sum(per) / k, min(per), max(per)
                ok = vmax <= limit and (limit != 1 or vmin == 1)
                note = (f"counted by etcd (grpc_server_handled_total, unary KV calls) around each request: "
                        f"min {vmin}, max {vmax}; " + note)
                if p["node_total"] != sum(sum(x.values()) for x in p["server_per_request_by_method"]):
                    note += ("; NOTE the node's cargohold_etcd_request_duration_seconds_count "
                             f"({p['node_total']}) misses requests etcd saw "
                             f"({sum(sum(x.values()) for x in p['server_per_request_by_method'])})")
                rows.append(Row("etcd_round_trips", f"{label}, 1 node", value, "req/op", target, ok, note=note))
            else:
                # the receiving node's own count (it counts its Range reads too: the 1-node rows
                # check it against etcd's), less its withdraw txn and its own status reports
                per = p["node_per_request"]
                value = p["node_request_path"] / k
                ok = value <= limit and (limit != 1 or value == 1)
                rows.append(Row("etcd_round_trips", f"{label}, 3 nodes: receiving node",
                                value, "req/op", target, ok,
                                note=f"the node's /metrics count over the phase ({p['node_total']}) less its "
                                     f"{p['withdrawals']} withdraw txns (placement: it is not an owner) and its "
                                     f"{p['own_reports']} status reports (from the watch; none near the phase's "
                                     f"ends), / {k}; per request window (reports found by watch time, which "
                                     f"can fall a window off): min {min(per)}, max {max(per)}; background "
                                     f"status/probe Puts in the windows: {sum(p['background_puts_per_request'])}; "
                                     + note))
                rows.append(Row("etcd_round_trips", f"{label}, 3 nodes: cluster-wide (etcd Txn)",
                                srv["Txn"] / k, "txn/op", "info (replication)",
                                note=f"{p['copy_txn_expected']:.2f}/op predicted from placement: 1 by the receiving "
                                     f"node + 1 record_copy per owner lacking a copy + 1 drop_copy when the "
                                     f"receiving node is not an owner"))
    return rows


def _etcd_counts(cl: Cluster) -> dict[str, int]:
    counts = metrics.etcd_rpc_counts(cl.etcd.samples())
    return {m: counts.get(m, 0) for m in ("Txn", "Range", "Put", "DeleteRange", "LeaseGrant", "LeaseRevoke")}


def _node_requests(s: dict) -> int:
    """The node's etcd round trips less its lease keepalives (background, every ttl/3; trees
    before the keepalive counter are taken as they are)."""
    refreshes = metrics.value(s, metrics.LEASE_REFRESHES)
    return int(metrics.value(s, metrics.ETCD_REQUESTS) - (refreshes or 0))


def _round_trips(ctx, n_nodes: int, k: int, size: int) -> dict:
    repo = "bench/rt"
    wd = Path(tempfile.mkdtemp(prefix=f"rt{n_nodes}-", dir=ctx.base))
    owners = owners_fn()
    replicas = min(2, n_nodes)
    res: dict = {}
    with Cluster(wd, f"rt{n_nodes}", ctx.settings) as cl:
        ids = [f"n{i + 1}" for i in range(n_nodes)]
        for nid in ids:
            cl.add(nid)
        recv = cl.nodes["n1"]
        base = recv.url
        copies = 0
        pushed: list[str] = []      # every blob and manifest digest, for the expected placement

        def expected_held() -> dict[str, int]:
            return {nid: sum(1 for d in pushed if nid in owners(d, ids, replicas)) for nid in ids}

        with httpx.Client(timeout=60.0) as c, EtcdWatch(cl.etcd.url, cl.prefix) as watch:
            # warm-up (not counted): the repository record, a config blob, one image
            config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
            cfg = (oci.push_blob(c, repo, config, base=base), len(config))
            warm = oci.random_bytes(size, "rt-warm")
            wd_ = oci.push_blob(c, repo, warm, base=base)
            warm_manifest = oci.manifest_bytes(cfg, [(wd_, size)])
            oci.push_manifest(c, repo, "warm", warm_manifest, base=base)
            pushed += [cfg[0], wd_, oci.digest_of(warm_manifest)]
            copies += 3 * replicas
            wait_quiet(cl, 60, copies=copies, held=expected_held())

            layers = [oci.random_bytes(size, f"rt-{n_nodes}-{i}") for i in range(k)]
            layer_digests = [oci.digest_of(b) for b in layers]
            docker_layers = [oci.random_bytes(size, f"rt-docker-{n_nodes}-{i}") for i in range(k)]
            docker_digests = [oci.digest_of(b) for b in docker_layers]
            manifests = [oci.manifest_bytes(cfg, [(layer_digests[i], size), (docker_digests[i], size)])
                         for i in range(k)]

            for phase, _label, _target, _limit in RT_PHASES:
                node_per_request, server_per_request, server_by_method, background = [], [], [], []
                digests = []
                # the nodes report their replication status every 2 s while it changes: with no
                # report near either end of the phase, the receiving node's own reports inside
                # it are counted exactly from the watch
                time.sleep(STATUS_SETTLE)
                s0 = cl.samples()
                e0 = _etcd_counts(cl)
                tp0 = time.monotonic()
                for i in range(k):
                    a, ea = recv.samples(c), _etcd_counts(cl)
                    ta = time.monotonic()
                    if phase == "blob":
                        oci.push_blob(c, repo, layers[i], layer_digests[i], base=base)
                        digests.append(layer_digests[i])
                    elif phase == "blob_docker":
                        oci.push_blob_docker(c, repo, docker_layers[i], docker_digests[i], base=base)
                        digests.append(docker_digests[i])
                    else:
                        oci.push_manifest(c, repo, f"t{i}", manifests[i], base=base)
                        digests.append(oci.digest_of(manifests[i]))
                    copies += replicas
                    pushed.append(digests[-1])
                    # The window closes only when this request's replication is over (every blob on
                    # exactly its owners): then it holds, deterministically, the request's own etcd
                    # calls plus that replication, and the next window starts clean.
                    if n_nodes > 1:
                        wait_quiet(cl, 60, copies=copies, held=expected_held(), stable=0.15, interval=0.02)
                    b, eb = recv.samples(c), _etcd_counts(cl)
                    tb = time.monotonic()
                    time.sleep(0.05)                   # let the window's watch events arrive
                    # the receiving node's own replication work for this blob: when it is not an
                    # owner, it withdraws its copy once the owners have theirs (one txn)
                    drops = 0 if "n1" in owners(digests[-1], ids, replicas) else 1
                    # background writes that are no part of the request: the nodes' replication
                    # status reports (plain Puts of status/<node>) and readiness probes (probes/<node>);
                    # found by key in the watch, taken out of the window's counts (etcd's, and the
                    # receiving node's own for its own reports) and reported
                    window = [key for t, kind, key, _rev in list(watch.events) if ta <= t <= tb + 0.05
                              and kind == "put" and key.startswith(("status/", "probes/"))]
                    bg = len(window)
                    own_bg = sum(1 for key in window if key in ("status/n1", "probes/n1"))
                    node_per_request.append(_node_requests(b) - _node_requests(a) - drops - own_bg)
                    by_method = {m: eb[m] - ea[m] for m in ea if eb[m] - ea[m]}
                    if bg:
                        by_method["Put"] = by_method.get("Put", 0) - bg
                        if by_method["Put"] <= 0:
                            by_method.pop("Put")
                    background.append(bg)
                    server_by_method.append(by_method)
                    server_per_request.append(sum(by_method.values()))
                wait_quiet(cl, 60, copies=copies, held=expected_held())
                time.sleep(STATUS_SETTLE)
                tp1 = time.monotonic()
                s1 = cl.samples()
                e1 = _etcd_counts(cl)
                cluster_total = sum(_node_requests(s1[n]) - _node_requests(s0[n]) for n in ids)
                node_total = _node_requests(s1["n1"]) - _node_requests(s0["n1"])
                own_reports = sum(1 for t, kind, key, _rev in list(watch.events) if tp0 <= t <= tp1
                                  and kind == "put" and key in ("status/n1", "probes/n1"))
                withdrawals = sum(1 for d in digests if "n1" not in owners(d, ids, replicas))
                server = {m: e1[m] - e0[m] for m in e0}
                exp = 0
                for d in digests:
                    o = owners(d, ids, replicas)
                    exp += 1 + sum(1 for x in o if x != "n1") + (0 if "n1" in o else 1)
                res[phase] = {
                    "node_per_request": node_per_request, "server_per_request": server_per_request,
                    "server_per_request_by_method": server_by_method, "background_puts_per_request": background,
                    "node_total": node_total, "cluster_total": cluster_total, "server": server,
                    "own_reports": own_reports, "withdrawals": withdrawals,
                    "node_request_path": node_total - own_reports - withdrawals,
                    "copy_txn_expected": exp / k,
                    "per_node": {n: _node_requests(s1[n]) - _node_requests(s0[n]) for n in ids},
                }
                ctx.log(f"[etcd_round_trips] {n_nodes} node(s), {k} x {phase}: receiving node's metric "
                        f"{sum(node_per_request)} in the requests ({node_total} over the phase); all nodes "
                        f"{cluster_total} {res[phase]['per_node']}; etcd saw {server} "
                        f"(per request: {_summary(server_by_method)}; background status/probe Puts taken out "
                        f"of request windows: {sum(background)}); placement predicts {exp} txns")
    shutil.rmtree(wd, ignore_errors=True)
    return res


def _summary(per_request: list[dict]) -> str:
    c = collections.Counter(tuple(sorted(d.items())) for d in per_request)
    return ", ".join(f"{n}x {dict(k) or '{}'}" for k, n in c.most_common())


PARTS = {
    "aggregate_pull": bench_aggregate_pull,
    "rebalance_join": bench_rebalance_join,
    "etcd_round_trips": bench_etcd_round_trips,
}
