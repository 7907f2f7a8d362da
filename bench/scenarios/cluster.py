#!/usr/bin/env python3
"""cargohold cluster benchmarks (issue 3, "Performance"): one etcd and 1-4 nodes on loopback.

    /work/venv/bin/python bench/cluster.py [--only NAME[,NAME]] [--quick] [--json FILE]

    aggregate_pull     24 different 32 MiB blobs pulled by 24 parallel curl clients,
                       1 node vs 3 nodes (replicas 2); the ratio, and the share served remotely
    rebalance_join     3 nodes, N blobs; a 4th node joins: bytes moved vs the ideal 1/4 of the
                       copy-bytes, and transfer MB/s vs this disk's fsync'ed write speed
    etcd_round_trips   etcd requests per blob upload and per manifest PUT, counted by the nodes'
                       /metrics and by etcd's own gRPC counters, on 1 and 3 nodes

Run by hand; never part of the test suite. See bench/CLUSTER.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster_harness as H  # noqa: E402
from cluster_harness import Cluster, metric  # noqa: E402

MiB = 1 << 20
MB = 1_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
SETTLE_POLL = 0.2        # seconds between placement polls (the nodes' /metrics) in rebalance_join


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
    raw: dict = field(default_factory=dict)
    profile: bool = False
    rebalance_blobs: int | None = None
    rebalance_size: int | None = None      # bytes per blob
    node_settings: dict = field(default_factory=dict)
    pyspy: str = "py-spy"
    profile_gil: bool = False

    def log(self, msg: str) -> None:
        print(msg, flush=True)


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit in ("MB/s",):
        return f"{v:,.0f} {unit}"
    if unit == "x" or unit == "":
        return f"{v:.2f}{unit}"
    if unit == "%":
        return f"{v:.1f} %"
    return f"{v:,.2f} {unit}"


def table(rows: list[Row]) -> str:
    head = ["benchmark", "metric", "value", "target", "result"]
    body = [[r.benchmark, r.metric, fmt(r.value, r.unit), r.target, r.verdict] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    notes = [f"- {r.benchmark} / {r.metric}: {r.note}" for r in rows if r.note]
    errs = [f"- {r.benchmark} / {r.metric}: ERROR {r.error}" for r in rows if r.error]
    return "\n".join([line(head), sep, *(line(b) for b in body), "", *notes, *errs])


# --------------------------------------------------------------------------- content and OCI client

def make_blob(size: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob_file(path: Path, size: int, seed: str) -> str:
    data = make_blob(size, seed)
    path.write_bytes(data)
    return digest_of(data)


def _check(r: httpx.Response, *codes: int) -> httpx.Response:
    if r.status_code not in codes:
        try:
            body = r.read()[:300]
        except httpx.HTTPError:
            body = b""
        raise RuntimeError(f"{r.request.method} {r.request.url} -> {r.status_code}: {body!r}")
    return r


def push_blob(c: httpx.Client, base: str, repo: str, data: bytes, digest: str | None = None) -> str:
    digest = digest or digest_of(data)
    _check(c.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
                  headers={"Content-Type": "application/octet-stream"}), 201)
    return digest


def push_blob_file(c: httpx.Client, base: str, repo: str, path: Path, digest: str) -> None:
    size = path.stat().st_size

    def chunks():
        with open(path, "rb") as f:
            while b := f.read(4 * MiB):
                yield b

    _check(c.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=chunks(),
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}), 201)


def manifest_bytes(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
           "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers]}
    return json.dumps(doc, separators=(",", ":")).encode()


def push_manifest(c: httpx.Client, base: str, repo: str, tag: str, body: bytes) -> None:
    _check(c.put(f"{base}/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST}), 201)


# --------------------------------------------------------------------------- placement helpers

def owners_fn():
    """cargohold's own rendezvous rule (imported read-only from the benchmarked tree)."""
    if str(H.SOURCE["dir"]) not in sys.path:
        sys.path.insert(0, str(H.SOURCE["dir"]))
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (all threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) jiffies of all CPUs so far, from /proc/stat (every process on the machine)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]          # idle + iowait
    return float(sum(fields) - idle), float(idle)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- py-spy (optional)

class Profiler:
    """`py-spy record` of every node of a cluster while a step runs (--profile)."""

    def __init__(self, ctx: Ctx, cl: Cluster, name: str):
        self.ctx, self.cl, self.name = ctx, cl, name
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def __enter__(self):
        if not self.ctx.profile:
            return self
        for nid, node in self.cl.nodes.items():
            self.add(nid, node.pid)
        time.sleep(1.0)
        return self

    def add(self, nid: str, pid: int) -> None:
        """Sample one more process (e.g. a node started inside the profiled step)."""
        if not self.ctx.profile:
            return
        d = self.ctx.base / "profiles"
        d.mkdir(exist_ok=True)
        out = d / f"{self.name}-{nid}.txt"
        p = subprocess.Popen([self.ctx.pyspy, "record", "--pid", str(pid), "--rate", "200",
                              "--format", "raw", "--output", str(out), "--threads",
                              "--gil" if self.ctx.profile_gil else "--idle", "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append((nid, p, out))

    def __exit__(self, *exc):
        import signal as _signal
        for nid, p, out in self.procs:
            if p.poll() is None:
                p.send_signal(_signal.SIGINT)
        for nid, p, out in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            if out.exists():
                self.ctx.raw.setdefault("profiles", {})[f"{self.name}-{nid}"] = str(out)
                self.ctx.log(f"[profile] {self.name} {nid}: {out}")
                self.ctx.log(summarize_profile(out))


def summarize_profile(raw: Path, top: int = 15) -> str:
    import collections
    self_c: collections.Counter = collections.Counter()
    total_c: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    n = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread (")), "?")
        frames = [f.split(" (")[0] + " (" + f.split(" (", 1)[1].split("site-packages/")[-1].split("/work/main/")[-1]
                  if " (" in f else f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        n += c
        threads[thread] += c
        self_c[frames[-1]] += c
        for f in set(frames):
            total_c[f] += c
    if not n:
        return "  (no samples)"
    out = [f"  {n} samples; self (top of stack):"]
    out += [f"   {100 * c / n:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    out += ["  total (anywhere on stack):"]
    out += [f"   {100 * c / n:5.1f}%  {f}" for f, c in total_c.most_common(top)]
    return "\n".join(out)


# =========================================================================== aggregate_pull

def bench_aggregate_pull(ctx: Ctx) -> list[Row]:
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
    raw = ctx.raw["aggregate_pull"] = {"blob_size": size, "blobs": n_blobs, "clients": clients,
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


def _pull_cluster(ctx: Ctx, n_nodes: int, files, size: int, clients: int, rounds: int) -> dict:
    repo = "bench/pull"
    wd = Path(tempfile.mkdtemp(prefix=f"pull{n_nodes}-", dir=ctx.base))
    with Cluster(wd, f"pull{n_nodes}", ctx.node_settings) as cl:
        for i in range(n_nodes):
            cl.add(f"n{i + 1}")
        urls = cl.urls()
        ids = list(cl.nodes)
        t0 = time.perf_counter()
        with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as c:
            def push(i):
                p, d = files[i]
                push_blob_file(c, urls[i % n_nodes], repo, p, d)
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(push, range(len(files))))
        ctx.log(f"[aggregate_pull] {n_nodes} node(s): pushed {len(files)} blobs in {time.perf_counter() - t0:.1f}s")
        digests = {d for _, d in files}
        replicas = min(2, n_nodes)
        settle_s, holders = wait_placement(cl, digests, ids, replicas, timeout=600)
        cl.wait_quiet(120, copies=replicas * len(files))
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
                    _check(r, 200)
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
        cpu0 = {nid: cpu_seconds(n.pid) for nid, n in cl.nodes.items()}
        ccpu0 = children_cpu()
        procs = []
        t0 = time.perf_counter()
        for client in plan:
            cmd = ["curl", "-s", "-S", "--max-time", "600", "-w", "%{http_code} %{size_download} %{time_total}\\n"]
            for ni, bi in client:
                cmd += ["-o", "/dev/null", f"{urls[ni]}/v2/{repo}/blobs/{files[bi][1]}"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=900) for p in procs]
        wall = time.perf_counter() - t0
        ccpu = children_cpu() - ccpu0
        node_cpu = {nid: cpu_seconds(n.pid) - cpu0[nid] for nid, n in cl.nodes.items()}
        after = cl.samples()
        total = 0
        times = {"local": [], "remote": []}
        for client, p, (out, err) in zip(plan, procs, outs):
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
        got_per_node = {nid: int(metric(after[nid], "cargohold_http_requests_total", route="blob", method="GET",
                                        status="200")
                                 - metric(before[nid], "cargohold_http_requests_total", route="blob", method="GET",
                                          status="200")) for nid in ids}
        sent = {nid: int(metric(after[nid], "cargohold_http_bytes_sent_total")
                         - metric(before[nid], "cargohold_http_bytes_sent_total")) for nid in ids}
        res = {"nodes": n_nodes, "seconds": wall, "bytes": total, "MBps": total / wall / MB,
               "pulls": pulls, "remote_pulls": remote, "remote_share": remote / pulls,
               "planned_gets_per_node": planned_per_node, "metrics_gets_per_node": got_per_node,
               "metrics_match_plan": planned_per_node == got_per_node, "bytes_sent_per_node": sent,
               "node_cpu_s": sum(node_cpu.values()), "node_cpu_per_node": node_cpu, "curl_cpu_s": ccpu,
               "placement_settle_s": settle_s,
               "mean_transfer_s": {k: (sum(v) / len(v) if v else None) for k, v in times.items()},
               "held": {nid: int(metric(after[nid], "cargohold_blobs_held", unit="blobs")) for nid in ids}}
        ctx.log(f"[aggregate_pull] {n_nodes} node(s): {total / MB:,.0f} MB in {wall:.2f}s = "
                f"{res['MBps']:,.0f} MB/s; remote pulls {remote}/{pulls}; node CPU "
                f"{res['node_cpu_s']:.1f}s, curl CPU {ccpu:.1f}s; GETs per node {got_per_node}")
    shutil.rmtree(wd, ignore_errors=True)
    return res


# =========================================================================== rebalance_join

def blob_pattern_speed(directory: Path, count: int, size: int, writers: int) -> float:
    """MB/s of the store's write pattern for fetched blobs: ``writers`` threads each writing
    ``size``-byte files to a staging dir, fsync, rename into a fan-out dir, fsync that dir."""
    root = directory / "blob-pattern"
    (root / "staging").mkdir(parents=True, exist_ok=True)
    data = random.Random("pattern").randbytes(size)

    def one(i: int) -> None:
        staging = root / "staging" / f"{i}"
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        d = root / "blobs" / f"{i % 256:02x}"
        d.mkdir(parents=True, exist_ok=True)
        os.replace(staging, d / f"{i}")
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(writers) as ex:
        list(ex.map(one, range(count)))
    seconds = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    return count * size / seconds / MB


def disk_write_speed(directory: Path, total: int, chunk: int = 8 * MiB) -> float:
    """MB/s writing ``total`` bytes in ``chunk`` writes to a new file, fsync included."""
    path = directory / "disk-speed.tmp"
    block = random.Random("disk").randbytes(chunk)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = total
        while left > 0:
            left -= os.write(fd, block[:min(chunk, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return total / seconds / MB


def device_write_speed(directory: Path, total: int, chunk: int = 8 * MiB) -> float | None:
    """MB/s writing ``total`` bytes with O_DIRECT from one reused aligned buffer, fsync included:
    the device itself, without the page cache (whose fresh pages cost this VM more CPU than the
    copy, which makes the buffered figure swing between ~350 and ~1,700 MB/s). None where the
    file system refuses O_DIRECT."""
    import mmap
    path = directory / "device-speed.tmp"
    buffer = mmap.mmap(-1, chunk)
    buffer.write(random.Random("device").randbytes(chunk))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return None
    t0 = time.perf_counter()
    try:
        left = total
        while left > 0:
            left -= os.write(fd, buffer)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()
    seconds = time.perf_counter() - t0
    path.unlink()
    return total / seconds / MB


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
                        except httpx.HTTPError:
                            continue            # not listening yet
                        held[nid] = int(metric(s, "cargohold_blobs_held", unit="blobs"))
                        queued += metric(s, "cargohold_replication_queue_depth")
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


def bench_rebalance_join(ctx: Ctx) -> list[Row]:
    n_blobs, size = (60, 256 * 1024) if ctx.quick else (200, 1 * MiB)
    n_blobs = ctx.rebalance_blobs or n_blobs
    size = ctx.rebalance_size or size
    disk_total = (256 if ctx.quick else 512) * MiB
    repo = "bench/rebalance"
    wd = Path(tempfile.mkdtemp(prefix="rebalance-", dir=ctx.base))
    raw = ctx.raw["rebalance_join"] = {"blobs": n_blobs, "blob_size": size, "poll_interval_s": SETTLE_POLL}
    disk_runs = [disk_write_speed(wd, disk_total) for _ in range(2)]
    ctx.log(f"[rebalance_join] disk: {disk_total // MiB} MiB in 8 MiB writes + fsync: "
            + ", ".join(f"{x:,.0f}" for x in disk_runs) + " MB/s")
    owners = owners_fn()
    with Cluster(wd, "rebalance", ctx.node_settings) as cl:
        for i in range(3):
            cl.add(f"n{i + 1}")
        urls = cl.urls()
        blobs = [make_blob(size, f"rebalance-{i}-{size}") for i in range(n_blobs)]
        digests = [digest_of(b) for b in blobs]
        t0 = time.perf_counter()
        with httpx.Client(timeout=60.0) as c:
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(lambda i: push_blob(c, urls[i % 3], repo, blobs[i], digests[i]), range(n_blobs)))
        blobs.clear()        # free the memory
        three = ["n1", "n2", "n3"]
        settle_s, holders_before = wait_placement(cl, set(digests), three, 2, timeout=300)
        cl.wait_quiet(120, copies=2 * n_blobs)
        ctx.log(f"[rebalance_join] {n_blobs} x {size // 1024} KiB pushed round-robin in "
                f"{time.perf_counter() - t0:.1f}s, on their 2 owners {settle_s:.1f}s later")
        list_before = cl.node_list()
        fetched_before = {nid: metric(s, "cargohold_replication_bytes_fetched") for nid, s in cl.samples().items()}

        trace_before = _read_traces(cl)
        cpu_before = {nid: cpu_seconds(node.pid) for nid, node in cl.nodes.items()}
        cpu_before["etcd"] = cpu_seconds(cl.etcd.proc.pid)
        machine_before = machine_cpu()
        four = three + ["n4"]
        poller = PlacementPoller(cl, set(digests), four, "n4", 2)
        with H.WatchRecorder(cl.etcd, cl.prefix) as watch, Profiler(ctx, cl, "rebalance_join") as prof:
            node4 = cl.add("n4", wait=False)
            prof.add("n4", node4.pid)
            poller.start()
            node4.wait_ready(120)
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
        cpu_join = {nid: cpu_seconds(node.pid) - cpu_before.get(nid, 0.0) for nid, node in cl.nodes.items()}
        cpu_join["etcd"] = cpu_seconds(cl.etcd.proc.pid) - cpu_before["etcd"]
        busy, idle = (a - b for a, b in zip(machine_cpu(), machine_before))
        cl.wait_quiet(120, copies=2 * n_blobs)
        trace_after = _read_traces(cl)
        samples = cl.samples()
        fetched = {nid: int(metric(s, "cargohold_replication_bytes_fetched") - fetched_before.get(nid, 0))
                   for nid, s in samples.items()}
        n4_etcd = (int(metric(samples["n4"], "cargohold_etcd_request_seconds", stat="count")),
                   metric(samples["n4"], "cargohold_etcd_request_seconds", stat="sum"))
        n4_cpu = cpu_seconds(node4.pid)
        list_after = cl.node_list()
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
    t_spawn, t_ready = node4.spawned_at, node4.ready_at
    window_ready = poller.settled_at - t_ready
    window_spawn = poller.settled_at - t_spawn
    window_first = poller.settled_at - poller.first_copy_at if poller.first_copy_at else None
    rate = moved / window_ready / MB if window_ready > 0 else float("inf")
    # the same transfer as etcd saw it, timestamped by a watch (no polling latency)
    tl = _timeline(watch.events, "n4")
    fetch_window = (tl["last_n4_copy"] - tl["registered"]) if tl["last_n4_copy"] and tl["registered"] else None
    rate_watch = moved / fetch_window / MB if fetch_window else None
    disk_runs.append(disk_write_speed(ctx.base, disk_total))
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
    if trace_after:
        raw["trace"] = _trace_delta(trace_before, trace_after)
        ctx.log(format_trace(raw["trace"]))
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


def _read_traces(cl: Cluster) -> dict[str, dict]:
    """The step timers of every traced node (--trace); waits for the 0.5 s dump."""
    if H.TRACE["dir"] is None:
        return {}
    time.sleep(0.7)
    out = {}
    for nid, node in cl.nodes.items():
        if node.trace_path is not None and node.trace_path.exists():
            out[nid] = json.loads(node.trace_path.read_text())
    return out


def _trace_delta(before: dict, after: dict) -> dict:
    out: dict = {}
    for nid, steps in after.items():
        prev = before.get(nid, {})
        for step, v in steps.items():
            p = prev.get(step, {"calls": 0, "seconds": 0.0})
            calls = v["calls"] - p["calls"]
            if calls:
                out.setdefault(nid, {})[step] = {"calls": calls, "seconds": v["seconds"] - p["seconds"],
                                                 "mean_ms": 1000 * (v["seconds"] - p["seconds"]) / calls}
    return out


def format_trace(trace: dict) -> str:
    lines = ["[trace] wall-clock time in replication steps during the join (sum over concurrent calls):"]
    for nid in sorted(trace):
        for step, v in sorted(trace[nid].items()):
            lines.append(f"  {nid} {step:<28} {v['calls']:6d} calls {v['seconds']:8.2f} s  "
                         f"mean {v['mean_ms']:7.2f} ms")
    return "\n".join(lines)


def _ms(t: float | None, t0: float) -> str:
    return "-" if t is None else f"{t - t0:.2f}s"


def _timeline(events, newcomer: str) -> dict:
    tl = {"registered": None, "alive": None, "first_n4_copy": None, "last_n4_copy": None, "last_drop": None}
    for t, kind, key in events:
        if key == f"members/{newcomer}" and tl["registered"] is None:
            tl["registered"] = t
        elif key == f"alive/{newcomer}" and tl["alive"] is None:
            tl["alive"] = t
        elif key.startswith("blobs/") and "/at/" in key:
            if kind == "PUT" and key.endswith(f"/at/{newcomer}"):
                tl["first_n4_copy"] = tl["first_n4_copy"] or t
                tl["last_n4_copy"] = t
            elif kind == "DELETE":
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


def bench_etcd_round_trips(ctx: Ctx) -> list[Row]:
    k = 20 if ctx.quick else 50
    size = 64 * 1024
    rows: list[Row] = []
    raw = ctx.raw["etcd_round_trips"] = {"K": k, "blob_size": size, "runs": {}}
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
                    note += ("; NOTE the node's cargohold_etcd_request_seconds count "
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
    counts = cl.etcd.rpc_counts(cl.etcd.samples())
    return {m: counts.get(m, 0) for m in ("Txn", "Range", "Put", "DeleteRange", "LeaseGrant", "LeaseRevoke")}


def _node_requests(s: dict) -> int:
    """The node's etcd round trips less its lease keepalives (background, every ttl/3; trees
    before the keepalive counter are taken as they are)."""
    refreshes = metric(s, "cargohold_etcd_lease_refreshes")
    return int(metric(s, "cargohold_etcd_request_seconds", stat="count") - (refreshes or 0))


def push_blob_docker(c: httpx.Client, base: str, repo: str, data: bytes, digest: str) -> None:
    """What `docker push` does for a layer: HEAD (404), POST, PATCH with the body, PUT ?digest=."""
    _check(c.head(f"{base}/v2/{repo}/blobs/{digest}"), 404)
    r = _check(c.post(f"{base}/v2/{repo}/blobs/uploads/"), 202)
    loc = httpx.URL(base).join(r.headers["Location"])
    r = _check(c.patch(loc, content=data, headers={"Content-Type": "application/octet-stream"}), 202)
    loc = httpx.URL(base).join(r.headers["Location"])
    _check(c.put(loc, params={"digest": digest}), 201)


def _round_trips(ctx: Ctx, n_nodes: int, k: int, size: int) -> dict:
    repo = "bench/rt"
    wd = Path(tempfile.mkdtemp(prefix=f"rt{n_nodes}-", dir=ctx.base))
    owners = owners_fn()
    replicas = min(2, n_nodes)
    res: dict = {}
    with Cluster(wd, f"rt{n_nodes}", ctx.node_settings) as cl:
        ids = [f"n{i + 1}" for i in range(n_nodes)]
        for nid in ids:
            cl.add(nid)
        recv = cl.nodes["n1"]
        base = recv.url
        copies = 0
        pushed: list[str] = []      # every blob and manifest digest, for the expected placement

        def expected_held() -> dict[str, int]:
            return {nid: sum(1 for d in pushed if nid in owners(d, ids, replicas)) for nid in ids}

        with httpx.Client(timeout=60.0) as c, H.WatchRecorder(cl.etcd, cl.prefix) as watch:
            # warm-up (not counted): the repository record, a config blob, one image
            config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
            cfg = (push_blob(c, base, repo, config), len(config))
            warm = make_blob(size, "rt-warm")
            wd_ = push_blob(c, base, repo, warm)
            warm_manifest = manifest_bytes(cfg, [(wd_, size)])
            push_manifest(c, base, repo, "warm", warm_manifest)
            pushed += [cfg[0], wd_, digest_of(warm_manifest)]
            copies += 3 * replicas
            cl.wait_quiet(60, copies=copies, held=expected_held())

            layers = [make_blob(size, f"rt-{n_nodes}-{i}") for i in range(k)]
            layer_digests = [digest_of(b) for b in layers]
            docker_layers = [make_blob(size, f"rt-docker-{n_nodes}-{i}") for i in range(k)]
            docker_digests = [digest_of(b) for b in docker_layers]
            manifests = [manifest_bytes(cfg, [(layer_digests[i], size), (docker_digests[i], size)])
                         for i in range(k)]

            for phase, _label, _target, _limit in RT_PHASES:
                node_per_request, server_per_request, server_by_method, background = [], [], [], []
                digests = []
                t0_trace = _read_traces(cl)
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
                        push_blob(c, base, repo, layers[i], layer_digests[i])
                        digests.append(layer_digests[i])
                    elif phase == "blob_docker":
                        push_blob_docker(c, base, repo, docker_layers[i], docker_digests[i])
                        digests.append(docker_digests[i])
                    else:
                        push_manifest(c, base, repo, f"t{i}", manifests[i])
                        digests.append(digest_of(manifests[i]))
                    copies += replicas
                    pushed.append(digests[-1])
                    # The window closes only when this request's replication is over (every blob on
                    # exactly its owners): then it holds, deterministically, the request's own etcd
                    # calls plus that replication, and the next window starts clean.
                    if n_nodes > 1:
                        cl.wait_quiet(60, copies=copies, held=expected_held(), stable=0.15, interval=0.02)
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
                    window = [key for t, kind, key in list(watch.events) if ta <= t <= tb + 0.05
                              and kind == "PUT" and key.startswith(("status/", "probes/"))]
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
                cl.wait_quiet(60, copies=copies, held=expected_held())
                time.sleep(STATUS_SETTLE)
                tp1 = time.monotonic()
                s1 = cl.samples()
                e1 = _etcd_counts(cl)
                cluster_total = sum(_node_requests(s1[n]) - _node_requests(s0[n]) for n in ids)
                node_total = _node_requests(s1["n1"]) - _node_requests(s0["n1"])
                own_reports = sum(1 for t, kind, key in list(watch.events) if tp0 <= t <= tp1
                                  and kind == "PUT" and key in ("status/n1", "probes/n1"))
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
                t1_trace = _read_traces(cl)
                if t1_trace:
                    calls = {nid: {step.split("etcd.call.", 1)[1]: v["calls"] for step, v in steps.items()
                                   if step.startswith("etcd.call.")}
                             for nid, steps in _trace_delta(t0_trace, t1_trace).items()}
                    res[phase + "_trace"] = calls
                    ctx.log(f"[trace] {n_nodes} node(s), {phase} phase, etcd calls by method<-caller: {calls}")
                ctx.log(f"[etcd_round_trips] {n_nodes} node(s), {k} x {phase}: receiving node's metric "
                        f"{sum(node_per_request)} in the requests ({node_total} over the phase); all nodes "
                        f"{cluster_total} {res[phase]['per_node']}; etcd saw {server} "
                        f"(per request: {_summary(server_by_method)}; background status/probe Puts taken out "
                        f"of request windows: {sum(background)}); placement predicts {exp} txns")
    shutil.rmtree(wd, ignore_errors=True)
    return res


def _summary(per_request: list[dict]) -> str:
    import collections
    c = collections.Counter(tuple(sorted(d.items())) for d in per_request)
    return ", ".join(f"{n}x {dict(k) or '{}'}" for k, n in c.most_common())


# =========================================================================== main

BENCHMARKS = {
    "aggregate_pull": bench_aggregate_pull,
    "rebalance_join": bench_rebalance_join,
    "etcd_round_trips": bench_etcd_round_trips,
}


def machine_info() -> dict:
    model = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(H.SOURCE["dir"]), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"

    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "etcd": ver([H.ETCD_BIN, "--version"]),
        "curl": ver(["curl", "--version"]),
        "source": str(H.SOURCE["dir"]),
        "git_commit": H.SOURCE.get("commit") or git("rev-parse", "HEAD"),
        "cargohold_uncommitted": [] if H.SOURCE.get("commit") else
        git("status", "--porcelain", "--", "cargohold").splitlines(),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[],
                    help=f"run only these (repeat or comma list): {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 8 MiB pull blobs x 1 round, 60 x 256 KiB rebalance, K=20")
    ap.add_argument("--json", metavar="FILE", help="write rows + raw measurements as JSON")
    ap.add_argument("--source", metavar="DIR",
                    help="the tree whose cargohold package the nodes run (default: this repository; "
                         "e.g. a `git worktree` of a commit); its root or its cargohold/ directory")
    ap.add_argument("--commit", metavar="REF",
                    help="run the nodes from `git archive REF` of this repository (extracted into the scratch "
                         "dir) instead of the working tree, e.g. --commit HEAD when others have uncommitted edits")
    ap.add_argument("--trace", action="store_true",
                    help="run the nodes under bench/cluster_trace.py (wall-clock timers around replication "
                         "steps, cargohold unchanged) and print where the rebalance time goes")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy record every node during the rebalance (needs py-spy)")
    ap.add_argument("--profile-gil", action="store_true",
                    help="like --profile, but only samples of threads holding the GIL (where Python CPU goes)")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"))
    ap.add_argument("--rebalance-blobs", type=int, metavar="N",
                    help="rebalance_join: number of blobs (default 200 x 1 MiB; --quick 60 x 256 KiB)")
    ap.add_argument("--rebalance-size", type=float, metavar="MIB",
                    help="rebalance_join: size of each blob in MiB (default 1; --quick 0.25)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra node setting for every cluster (YAML value), e.g. replication_workers=16")
    ap.add_argument("--workdir", help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, data)")
    args = ap.parse_args(argv)

    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every etcd and node is stopped by its pid
    import signal

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _terminate)

    names = [n for o in args.only for n in o.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    for tool in ("curl", H.ETCD_BIN):
        if not shutil.which(tool):
            ap.error(f"{tool} not found")
    if args.commit and args.source:
        ap.error("--commit and --source are exclusive")
    if args.source:
        source = Path(args.source).resolve()
        # The tree root goes on the nodes' PYTHONPATH. Given the package directory itself, the
        # nodes would not find `cargohold` there and silently import the venv's editable install.
        if not (source / "cargohold" / "__init__.py").exists() and (source / "__init__.py").exists() \
                and source.name == "cargohold":
            source = source.parent
        if not (source / "cargohold" / "__init__.py").exists():
            ap.error(f"--source {args.source}: no cargohold package there")
        H.SOURCE["dir"] = source
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cargohold-cluster-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    if args.commit:
        sha = subprocess.run(["git", "-C", str(H.REPO_ROOT), "rev-parse", "--verify", args.commit + "^{commit}"],
                             capture_output=True, text=True).stdout.strip()
        if not sha:
            ap.error(f"unknown commit {args.commit!r}")
        src = base / f"src-{sha[:12]}"
        src.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(H.REPO_ROOT), "archive", sha, "cargohold"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        H.SOURCE["dir"] = src
        H.SOURCE["commit"] = sha
    if args.trace:
        H.TRACE["dir"] = base / "traces"
        H.TRACE["dir"].mkdir(parents=True, exist_ok=True)
    ctx = Ctx(base=base, quick=args.quick, profile=args.profile or args.profile_gil,
              profile_gil=args.profile_gil, pyspy=args.py_spy,
              rebalance_blobs=args.rebalance_blobs,
              rebalance_size=int(args.rebalance_size * MiB) if args.rebalance_size else None)
    import yaml
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set wants KEY=VALUE, not {item!r}")
        ctx.node_settings[key.strip()] = yaml.safe_load(value)
    if ctx.node_settings:
        print(f"node settings: {ctx.node_settings}")

    info = machine_info()
    print(f"machine: {info['nproc']} cpus ({info['cpu_model']}), load {info['loadavg_start']}, {info['etcd']}")
    print(f"cargohold from {info['source']} at {info['git_commit']}"
          + (f" + uncommitted changes: {' '.join(x.split()[-1] for x in info['cargohold_uncommitted'])}"
             if info["cargohold_uncommitted"] else ""))
    print(f"scratch: {base}")

    rows: list[Row] = []
    t_all = time.perf_counter()
    try:
        for name in names:
            t0 = time.perf_counter()
            print(f"\n=== {name} ===", flush=True)
            try:
                rows += BENCHMARKS[name](ctx)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append(Row(name, "(benchmark failed)", None, error=f"{type(e).__name__}: {e}"))
            print(f"=== {name}: {time.perf_counter() - t0:.0f}s ===", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; every process was stopped; partial results follow")
    finally:
        if args.keep:
            print(f"scratch kept: {base}")
        elif not args.workdir:
            shutil.rmtree(base, ignore_errors=True)

    info["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    info["seconds"] = round(time.perf_counter() - t_all, 1)
    print("\n" + table(rows))
    print(f"\n{info['date']}; {info['nproc']} cpus {info['cpu_model']}; load "
          f"{'/'.join(info['loadavg_start'])} -> {'/'.join(info['loadavg_end'])}; "
          f"{info['seconds']:.0f}s total" + ("; QUICK" if args.quick else ""))
    if args.json:
        doc = {"machine": info, "quick": args.quick, "rows": [asdict(r) | {"verdict": r.verdict} for r in rows],
               "details": ctx.raw}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"JSON written to {args.json}")
    return 1 if any(r.verdict in ("FAIL", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
