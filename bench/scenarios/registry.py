"""cargohold vs CNCF Distribution 2.8.2: manifest GET, big and parallel blobs; node memory.

Distribution is Debian's `docker-registry`. The memory part indexes 10,000 repositories x 10 tags
into one node (cargohold only).

Fresh servers with empty data directories for each side; A/B rounds alternate which side goes
first; medians are reported, as ratios cargohold / distribution. Needs `docker-registry`,
`wrk`, `curl`, `taskset` and `etcd` on PATH. --quick: 3 s wrk, 32 MiB big blob, 8 x 8 MiB
parallel blobs, 1,000 repositories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import launch, oci, procs
from bench.profiler import Profiler
from bench.report import Row, compared, median
from bench.scenarios import memory_index

MiB = 1 << 20
MB = 1_000_000
HERE = Path(__file__).resolve().parent
SIDES = ("cargohold", "distribution")
PEER = "distribution"


def add_arguments(ap) -> None:
    ap.add_argument("--rounds", type=int, default=1,
                    help="A/B rounds per benchmark, alternating order; medians (default 1)")
    ap.add_argument("--no-pin", action="store_true",
                    help="manifest_get: don't pin the registry and wrk to separate cores")
    ap.add_argument("--runtime", default="asyncio", help="cargohold --runtime (default asyncio)")
    ap.add_argument("--mem-repos", type=int, help="memory: repositories (default 10000)")
    ap.add_argument("--mem-timeout", type=float, help="memory: indexing deadline in seconds")
    ap.add_argument("--self-compare", action="store_true",
                    help="plumbing check: a second docker-registry plays cargohold (ratios ~1)")


def prepare(ctx) -> None:
    for tool in ("wrk", "curl", "taskset", launch.PEER_BIN):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    need_gb = 2 if ctx.quick else 8
    free_gb = shutil.disk_usage(ctx.base).free / 1e9
    if free_gb < need_gb:
        raise SystemExit(f"only {free_gb:.1f} GB free under {ctx.base}; this run needs about {need_gb} GB")
    ctx.details["errors"] = {}
    ctx.details["distribution"] = procs.tool_version([launch.PEER_BIN, "--version"])
    ctx.details["wrk"] = procs.tool_version(["wrk", "-v"])
    if ctx.args.self_compare:
        ctx.log("SELF-COMPARE: both sides are docker-registry (plumbing check; ratios should be ~1)")


def _rounds(ctx) -> int:
    return max(1, ctx.args.rounds)


@contextlib.contextmanager
def running(ctx, side: str, cpus: str | None = None):
    """A fresh server for `side` with its own empty data dir; its data is dropped when it stops
    (blobs are big and the disk is shared), its log kept."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=ctx.base))
    peer = side == "distribution" or ctx.args.self_compare
    srv = (launch.PeerRegistry(workdir / "data", cpus=cpus) if peer else
           launch.Node(workdir / "data", cpus=cpus, runtime=ctx.args.runtime))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        for d in (workdir / "data" / "data", workdir / "data" / "blobs"):
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def profiled(ctx, srv, name: str):
    """py-spy the cargohold node while the block runs (with --profile)."""
    with Profiler(ctx.pyspy if srv.kind == "cargohold" else None, ctx.profile_dir, name) as prof:
        prof.add("node", srv.pid)
        yield
    ctx.details.setdefault("profiles", {}).update({f"{name}-{k}": v for k, v in prof.summaries.items()})


def ab_rounds(ctx, name: str, fn, *, cpus: str | None = None) -> dict[str, list]:
    """Run ``fn(server, side, tag)`` on each side in fresh servers, once per round.

    The order alternates between rounds (C,D / D,C / ...) so slow drift of the
    shared machine does not favour one side.  Returns side -> [result per round].
    """
    out: dict[str, list] = {s: [] for s in SIDES}
    for rnd in range(_rounds(ctx)):
        for side in SIDES if rnd % 2 == 0 else SIDES[::-1]:
            tag = f"[{name}] {side}" + (f" round {rnd + 1}/{_rounds(ctx)}" if _rounds(ctx) > 1 else "")
            try:
                with running(ctx, side, cpus) as srv:
                    ctx.log(f"{tag}: {srv.url} pid {srv.pid} ready in {srv.last_ready_s:.2f}s")
                    out[side].append(fn(srv, side, tag))
            except Exception as e:  # noqa: BLE001 - one side failing must not hide the other
                msg = f"{type(e).__name__}: {e}"
                ctx.log(f"{tag}: FAILED: {msg}")
                ctx.details["errors"].setdefault(name, {})[side] = msg.splitlines()[0][:300]
    return out


def side_error(ctx, name: str) -> str:
    errs = ctx.details["errors"].get(name)
    return "; ".join(f"{s}: {m}" for s, m in errs.items()) if errs else ""


def row(benchmark: str, metric: str, unit: str, by_side: dict, **kw) -> Row:
    """A cargohold row with distribution's figure as its same-run peer."""
    return compared(benchmark, metric, unit, by_side.get("cargohold"), by_side.get("distribution"), **kw)


class CpuMeter:
    """Server CPU seconds (user + sys, whole process tree) spent inside the block."""

    def __init__(self, srv: launch.Node):
        self.srv = srv
        self.user = self.sys = self.main = self.wall = 0.0

    def _main_thread(self) -> float:
        return sum(procs.cpu_split(self.srv.pid, tid=self.srv.pid))

    def __enter__(self):
        self._start = procs.tree_cpu(self.srv.pid)
        self._main = self._main_thread()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        user, system = procs.tree_cpu(self.srv.pid)
        self.user += user - self._start[0]
        self.sys += system - self._start[1]
        self.main += self._main_thread() - self._main
        self.wall += time.perf_counter() - self._t0
        return False

    def as_dict(self) -> dict:
        """CPU seconds; main_thread_busy = share of wall time the main thread was on a CPU
        (for cargohold the event loop: near 1.0 means the loop is the bottleneck)."""
        return {"user": self.user, "sys": self.sys, "wall": self.wall,
                "main_thread": self.main,
                "main_thread_busy": self.main / self.wall if self.wall else None}

    @property
    def total(self) -> float:
        return self.user + self.sys


# =========================================================================== manifest_get

def cpu_plan(ctx) -> tuple[str | None, str | None]:
    """(server cpus, wrk cpus) for taskset, or (None, None) when not pinning."""
    if ctx.args.no_pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return str(cpus[0]), str(cpus[1])


def run_wrk(url: str, seconds: int, cpus: str | None, threads: int = 2, conns: int = 16,
            path: str | None = None) -> dict:
    """wrk with manifest_get.lua; `path` replaces its default /v2/bench/app/manifests/latest."""
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
           "-s", str(HERE / "manifest_get.lua"), url]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = dict(os.environ, BENCH_MANIFEST_PATH=path) if path else None
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr or r.stdout}")
    for line in r.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            res = json.loads(line[len("BENCH_JSON "):])
            res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
            res["cmd"] = " ".join(cmd)
            return res
    raise RuntimeError(f"no BENCH_JSON in wrk output:\n{r.stdout}\n{r.stderr}")


def manifest_get(ctx) -> list[Row]:
    seconds = 3 if ctx.quick else 10
    srv_cpus, wrk_cpus = cpu_plan(ctx)

    def one(srv: launch.Node, side: str, tag: str, wrk_cpus: str | None) -> dict:
        repo = "bench/app"
        with oci.client(srv.url) as c:
            body, digest = oci.push_image(c, repo, "latest")
            r = oci.get_manifest(c, repo, "latest")
            if r.content != body:
                raise oci.RegistryError(f"{side}: GET manifest returned other bytes")
            ctype = r.headers.get("content-type", "")
            if not ctype.startswith(oci.OCI_MANIFEST):
                raise oci.RegistryError(f"{side}: manifest Content-Type {ctype!r}")
            resp_bytes = len(r.content)
        url = srv.url
        run_wrk(url, 1, wrk_cpus)  # warm-up, discarded
        with profiled(ctx, srv, "manifest_get" + ("" if wrk_cpus else "_unpinned")):
            res = run_wrk(url, seconds, wrk_cpus)
        bad = {k: v for k, v in res["errors"].items() if v}
        if bad:
            raise RuntimeError(f"{side}: wrk saw errors {bad} (non-2xx are 'status')")
        per = res["bytes"] / max(res["requests"], 1)
        if per < resp_bytes:
            raise RuntimeError(f"{side}: {per:.0f} bytes/response < manifest size {resp_bytes}")
        res["bytes_per_response"] = per
        ctx.log(f"{tag}: {res['rps']:,.0f} req/s, p50 {res['latency_us']['p50'] / 1000:.2f} ms, "
                f"p99 {res['latency_us']['p99'] / 1000:.2f} ms ({res['requests']:,} requests)")
        return res

    rows = []
    variants = []
    if srv_cpus:
        variants.append(("manifest_get", srv_cpus, wrk_cpus,
                         f"registry (and its etcd) on cpu {srv_cpus}, wrk on cpu {wrk_cpus}",
                         5.0))
    variants.append(("manifest_get_unpinned", None, None, "nothing pinned",
                     None if srv_cpus else 5.0))
    for name, s_cpus, w_cpus, pin_note, target in variants:
        ctx.log(f"[{name}] {pin_note}")
        res = ab_rounds(ctx, name, lambda srv, side, tag: one(srv, side, tag, w_cpus),
                        cpus=s_cpus)
        err = side_error(ctx, name)
        rps = {s: median(r["rps"] for r in res[s]) for s in SIDES}
        p99 = {s: median(r["latency_us"]["p99"] / 1000 for r in res[s]) for s in SIDES}
        label = "pinned" if s_cpus else "unpinned"
        rows += [
            row("manifest_get", f"GET by tag, {label}", "req/s", rps, min_ratio=target,
                note=f"wrk -t2 -c16 -d{seconds}s keep-alive; {pin_note}", error=err),
            row("manifest_get", f"p99 latency, {label}", "ms", p99,
                note="lower is better (ratio < 1 is good)", error=err),
        ]
        ctx.details[name] = res
    return rows


# =========================================================================== blob_big

def _files(ctx, prefix: str, n: int, size: int, seed0: int) -> list[tuple[Path, str]]:
    d = ctx.base / "content"
    d.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"{prefix}-{size // MiB}MiB-{i}"
        meta = p.with_suffix(".digest")
        if p.exists() and meta.exists() and p.stat().st_size == size:
            out.append((p, meta.read_text()))
            continue
        dg = oci.make_file(p, size, seed0 + i)
        meta.write_text(dg)
        out.append((p, dg))
    return out


def blob_big(ctx) -> list[Row]:
    size = (32 if ctx.quick else 256) * MiB
    reps = 1 if ctx.quick else 3
    chunk = 16 * MiB
    t0 = time.perf_counter()
    mono = _files(ctx, "mono", reps, size, 1000)
    postput = _files(ctx, "postput", reps, size, 1500)
    chunked = _files(ctx, "chunked", reps, size, 2000)
    ctx.log(f"[blob_big] {3 * reps} files of {size // MiB} MiB ready "
            f"({time.perf_counter() - t0:.1f}s, not timed)")
    flows: dict[str, str] = {}

    def one(srv: launch.Node, side: str, tag: str) -> dict:
        repo = "bench/big"
        out = {"push_mono_s": [], "push_postput_s": [], "push_chunked_s": [], "pull_s": []}
        with oci.client(srv.url) as c:
            single = oci.supports_single_post(c, repo)
            flows[side] = "POST ?digest= + body" if single else "202, then PUT ?digest= + body"
            push_cpu, pull_cpu = CpuMeter(srv), CpuMeter(srv)
            with profiled(ctx, srv, "blob_big-push"), push_cpu:
                for i in range(reps):   # interleave the three flows
                    p, dg = mono[i]
                    out["push_mono_s"].append(oci.push_blob_file(c, repo, p, dg, single))
                    p, dg = postput[i]
                    out["push_postput_s"].append(oci.push_blob_file_post_put(c, repo, p, dg))
                    p, dg = chunked[i]
                    out["push_chunked_s"].append(
                        oci.push_blob_file_chunked(c, repo, p, dg, chunk))
            # every pushed blob is read back once and its sha256 checked (untimed; this
            # also warms both servers' page cache the same way before the timed pulls)
            for p, dg in (*mono, *postput, *chunked):
                oci.verify_blob(c, repo, dg, size)
            # timed pulls: curl to /dev/null, the cheapest client (bytes already verified)
            with profiled(ctx, srv, "blob_big-pull"), pull_cpu:
                for i in range(reps):
                    out["pull_s"].append(
                        curl_get(f"{srv.url}/v2/{repo}/blobs/{mono[i][1]}", size)[0])
            # informational: a Python client hashing while it reads (client-bound near 1-1.5 GB/s)
            out["pull_httpx_s"] = [oci.pull_blob_hashed(c, repo, mono[i][1], size)
                                   for i in range(reps)]
        mbps = {k.replace("_s", "_MBps"): [size / MB / t for t in v] for k, v in out.items()}
        out.update(mbps)
        out["monolithic_flow"] = flows[side]
        out["push_cpu_s_per_GB"] = push_cpu.total / (3 * reps * size / 1e9)
        out["pull_cpu_s_per_GB"] = pull_cpu.total / (reps * size / 1e9)
        out["push_cpu"] = push_cpu.as_dict()
        out["pull_cpu"] = pull_cpu.as_dict()
        ctx.log(f"{tag}: MB/s push mono {_fmt(mbps['push_mono_MBps'])} ({flows[side]}), "
                f"POST+PUT {_fmt(mbps['push_postput_MBps'])}, "
                f"chunked {_fmt(mbps['push_chunked_MBps'])}, pull {_fmt(mbps['pull_MBps'])}, "
                f"pull httpx+sha256 {_fmt(mbps['pull_httpx_MBps'])}")
        return out

    res = ab_rounds(ctx, "blob_big", one)
    err = side_error(ctx, "blob_big")
    ctx.details["blob_big"] = res

    def med(key):
        return {s: median(x for r in res[s] for x in r[key]) for s in SIDES}

    def med1(key):
        return {s: median(r[key] for r in res[s]) for s in SIDES}

    n = f"{size // MiB} MiB, median of {reps * _rounds(ctx)}"
    flow_note = "; ".join(f"{s}: {f}" for s, f in flows.items())
    return [
        row("blob_big", "push monolithic", "MB/s", med("push_mono_MBps"), min_ratio=1.0,
            note=f"{n}; {flow_note}", error=err),
        row("blob_big", "push POST then one PUT", "MB/s", med("push_postput_MBps"), min_ratio=1.0,
            note=n + "; same flow on both sides", error=err),
        row("blob_big", f"push chunked PATCH {chunk // MiB} MiB", "MB/s",
            med("push_chunked_MBps"), min_ratio=1.0, note=n, error=err),
        row("blob_big", "pull GET", "MB/s", med("pull_MBps"), min_ratio=1.0,
            note=n + "; curl -o /dev/null; sha256 checked on an untimed read first",
            error=err),
        row("blob_big", "pull GET, httpx + sha256", "MB/s", med("pull_httpx_MBps"),
            note=n + "; hashed in a 2nd client thread while reading; client-bound, info only",
            error=err),
        row("blob_big", "server CPU per GB pushed", "cpu-s/GB", med1("push_cpu_s_per_GB"),
            note="user+sys of the registry process tree (incl. cargohold's etcd) "
                        "over all pushes; lower is better", error=err),
        row("blob_big", "server CPU per GB pulled", "cpu-s/GB", med1("pull_cpu_s_per_GB"),
            note="same, over the timed curl pulls", error=err),
    ]


def curl_get(url: str, size: int, times: int = 1) -> list[float]:
    """GET ``url`` ``times`` times on one connection with curl into /dev/null.

    Returns each transfer's seconds (curl's time_total); checks status and size.
    """
    cmd = ["curl", "-s", "-S", "--fail", "--noproxy", "*",
           "-w", "%{http_code} %{size_download} %{time_total}\\n"]
    for _ in range(times):
        cmd += ["-o", "/dev/null", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"curl failed ({r.returncode}): {r.stderr.strip()}")
    return _parse_curl(r.stdout, size)


def _parse_curl(out: str, size: int) -> list[float]:
    secs = []
    for line in out.split("\n"):
        if not line.strip():
            continue
        code, got, t = line.split()
        if code != "200" or int(got) != size:
            raise RuntimeError(f"curl got HTTP {code}, {got} bytes (expected 200, {size})")
        secs.append(float(t))
    return secs


def _fmt(xs) -> str:
    return "/".join(f"{x:,.0f}" for x in xs)


# =========================================================================== blob_parallel

def blob_parallel(ctx) -> list[Row]:
    clients = 8
    size = (8 if ctx.quick else 32) * MiB
    loops = 2 if ctx.quick else 8     # each client fetches its blob this many times
    reps = 1 if ctx.quick else 3
    files = _files(ctx, "par", clients, size, 3000)

    def one(srv: launch.Node, side: str, tag: str) -> dict:
        repo = "bench/par"
        with oci.client(srv.url) as c:
            single = oci.supports_single_post(c, repo)
            for p, dg in files:
                oci.push_blob_file(c, repo, p, dg, single)
            for p, dg in files:        # content check, untimed
                oci.verify_blob(c, repo, dg, size)
        out = {"aggregate_MBps": [], "wall_s": [], "per_client": []}
        cpu = CpuMeter(srv)
        with profiled(ctx, srv, "blob_parallel"), cpu:
            for _ in range(reps):
                _parallel_rep(srv, repo, side, out)
        out["cpu_s_per_GB"] = cpu.total / (reps * clients * loops * size / 1e9)
        out["cpu"] = cpu.as_dict()
        out["machine_idle_pct"] = out.pop("idle")
        ctx.log(f"{tag}: aggregate {_fmt(out['aggregate_MBps'])} MB/s "
                f"({clients} curl x {loops} x {size // MiB} MiB per rep); server CPU "
                f"{cpu.total:.2f}s (user {cpu.user:.2f}, sys {cpu.sys:.2f}) in {cpu.wall:.2f}s, "
                f"main thread busy {cpu.main / cpu.wall:.0%}; "
                f"machine idle {_fmt(out['machine_idle_pct'])}%")
        return out

    def _parallel_rep(srv, repo, side, out):
        procs = []
        idle0 = _cpu_idle()
        t0 = time.perf_counter()
        for p, dg in files:
            url = f"{srv.url}/v2/{repo}/blobs/{dg}"
            cmd = ["curl", "-s", "-S", "--fail", "--noproxy", "*",
                   "-w", "%{http_code} %{size_download} %{time_total}\\n"]
            for _ in range(loops):
                cmd += ["-o", "/dev/null", url]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        outs = [pr.communicate(timeout=300) for pr in procs]
        wall = time.perf_counter() - t0
        idle1 = _cpu_idle()
        out.setdefault("idle", []).append(
            round(100.0 * (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1]), 1))
        total = 0
        per = []
        for pr, (so, se) in zip(procs, outs):
            if pr.returncode != 0:
                raise RuntimeError(f"{side}: curl failed ({pr.returncode}): {se.strip()}")
            for secs in _parse_curl(so, size):
                total += size
                per.append(size / MB / secs)
        out["aggregate_MBps"].append(total / MB / wall)
        out["wall_s"].append(wall)
        out["per_client"].append(statistics.mean(per))

    res = ab_rounds(ctx, "blob_parallel", one)
    err = side_error(ctx, "blob_parallel")
    ctx.details["blob_parallel"] = res
    agg = {s: median(x for r in res[s] for x in r["aggregate_MBps"]) for s in SIDES}
    cpu = {s: median(r["cpu_s_per_GB"] for r in res[s]) for s in SIDES}
    idle = median(x for s in SIDES for r in res[s] for x in r["machine_idle_pct"])
    return [row("blob_parallel", f"{clients} clients x {size // MiB} MiB pull, aggregate",
                "MB/s", agg, min_ratio=1.0,
                note=f"curl -o /dev/null, {loops} GETs/client/rep on one connection, "
                     f"median of {reps * _rounds(ctx)}; machine idle during the pulls: "
                     f"{idle}% (0 = CPU-bound box)", error=err),
            row("blob_parallel", "server CPU per GB pulled", "cpu-s/GB", cpu,
                note="user+sys of the registry process tree; lower is better", error=err)]


def _cpu_idle() -> tuple[int, int]:
    """(idle+iowait jiffies, all jiffies) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)


# =========================================================================== memory

def memory(ctx) -> list[Row]:
    n_repos = ctx.args.mem_repos or (1000 if ctx.quick else 10_000)
    n_tags = 10
    timeout = ctx.args.mem_timeout or (600 if ctx.quick else 2400)
    label = "[memory]"
    info: dict = {"repos": n_repos, "tags_per_repo": n_tags}
    ctx.details["memory"] = info
    with running(ctx, "cargohold") as srv:
        ctx.log(f"{label} {srv.url} pid {srv.pid} ready in {srv.last_ready_s:.2f}s")
        time.sleep(2)
        info["rss_start"] = srv.rss_kib()
        ctx.log(f"{label} RSS before indexing: {_mb(info['rss_start']):.1f} MB")
        idx = memory_index.index(srv.url, n_repos, n_tags, timeout=timeout,
                                 progress=lambda s: ctx.log(f"{label} {s}; node RSS {_mb(srv.rss_kib()):.1f} MB"))
        info["index"] = idx
        ctx.log(f"{label} indexed {idx['repos_done']:,}/{n_repos:,} repos "
                f"({idx['requests']:,} requests, {idx['errors']} errors) in {idx['seconds']:.1f}s "
                f"= {idx['requests'] / idx['seconds']:,.0f} req/s")
        time.sleep(2)
        info["rss_indexed"] = srv.rss_kib()
        ctx.log(f"{label} RSS after indexing: {_mb(info['rss_indexed']):.1f} MB")
        info["check_indexed"] = memory_index.spot_check(srv.url, idx["repos_done"], n_tags)
        ctx.log(f"{label} restarting the node (read model rebuilt from etcd)")
        srv.stop()
        srv.start()
        info["restart_ready_s"] = srv.last_ready_s
        ctx.log(f"{label} ready again in {srv.last_ready_s:.2f}s, pid {srv.pid}")
        time.sleep(2)
        info["rss_restart"] = srv.rss_kib()
        info["check_restart"] = memory_index.spot_check(srv.url, idx["repos_done"], n_tags)
        info["rss_restart_after_reads"] = srv.rss_kib()
        ctx.log(f"{label} RSS after restart: {_mb(info['rss_restart']):.1f} MB, "
                f"after spot-check reads {_mb(info['rss_restart_after_reads']):.1f} MB")
    complete = idx["repos_done"] == n_repos and idx["errors"] == 0
    err = "" if complete else (f"indexing incomplete: {idx['repos_done']}/{n_repos} repos, "
                               f"{idx['errors']} errors {idx.get('first_errors')}")
    for when in ("check_indexed", "check_restart"):
        chk = info[when]
        if complete and (chk["bad"] or not chk.get("tags_list_ok")):
            err = f"{when}: {chk['bad']}/{chk['checked']} wrong reads {chk['problems']}"
    scale = f"{idx['repos_done']:,} repos x {n_tags} tags"
    rss_after_restart = max(info["rss_restart"], info["rss_restart_after_reads"])
    return [
        Row("memory", "node RSS, empty", _mb(info["rss_start"]), "MB",
            note="VmRSS of the node process (etcd excluded)"),
        compared("memory", "node RSS, indexed", "MB", _mb(info["rss_indexed"]), None,
                 max_value=300, note=scale, error=err),
        compared("memory", "node RSS, after restart", "MB", _mb(rss_after_restart), None,
                 max_value=300, note=f"{scale}; ready in {info['restart_ready_s']:.1f}s", error=err),
        Row("memory", "indexing rate (API)", idx["requests"] / idx["seconds"], "req/s",
            note=f"{idx['concurrency']} concurrent clients, {idx['seconds']:.0f}s"),
    ]


def _mb(kib: int) -> float:
    return kib * 1024 / MB


PARTS = {
    "manifest_get": manifest_get,
    "blob_big": blob_big,
    "blob_parallel": blob_parallel,
    "memory": memory,
}
