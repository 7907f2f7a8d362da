"""Pull-through cache (issue 14): pulls through a remote repository vs direct and vs Distribution's proxy.

One upstream for the whole run: Distribution 2.8.2 (Debian `docker-registry`) with its access log
on, holding a 5-layer image of random (incompressible) layers, 5 x 40 MiB. A pull (except in
pull_client) is what a container runtime does (`bench/pull.py`): the manifest by tag, then the
config and every layer, three curl downloads at a time, into /dev/null.

    pull               per round, in rotating order: 1 + --warm-pulls direct pulls; a fresh
                       cargohold (its own etcd, remote repository `hub` defined with `cargohold
                       repo add` before the node starts) pulled cold, then warm; a fresh
                       Distribution in proxy mode (`proxy: remoteurl:`) pulled cold, then warm.
                       Each cache's bytes are sha256-checked between its cold and warm pulls
                       (untimed). Upstream requests of each cold and warm pull are counted from
                       the upstream's own access log.
    pull_link          the same, with the upstream reached (by the direct client and both caches)
                       through a loopback link whose downloads share --link-rate MB/s (50), as a
                       site's internet link does: there the upstream, not the CPU, is the slow side.
    pull_client        `pull` on loopback with a real container client doing each whole pull:
                       `skopeo copy --src-tls-verify=false docker://HOST:PORT/NAME:TAG dir:DIR` (its
                       defaults: up to 6 blobs at a time, every blob digest-verified and written to a
                       fresh DIR, deleted after each pull, untimed), so the rows show what users see;
                       `pull` (curl into /dev/null) stays the data-path measurement. Skipped, with
                       the reason, when skopeo is not on PATH.
    upstream_requests  one cargohold with two remote repositories of the same upstream: `hub`
                       (ttl 10m) and `hubttl` (ttl 1 s, or --expired-ttl); a small 5-layer image
                       is pulled once through each, then N more times (N = --pulls, 100), through
                       `hubttl` with a pause longer than its ttl before each pull. Counted from
                       the upstream's log: expect 0 requests within the ttl, 1 HEAD per pull after it.

--quick: 5 x 8 MiB layers, 1 round, 20 pulls. See the "Pull-through cache" section of
bench/RESULTS.md."""

from __future__ import annotations

import collections
import contextlib
import functools
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import ceiling, launch, procs, pull, skopeo
from bench.link import Link
from bench.profiler import Profiler
from bench.report import Row, compared, fmt, median
from tests.support.distribution import DistributionProcess

MiB = 1 << 20
PEER = "baseline"
LAYERS = 5
REMOTE, CACHE_TTL = "hub", "10m"          # the remote repository every cache cluster defines
EXPIRED = "hubttl"                        # the same upstream with a ttl that runs out between pulls
SIDES = ("direct", "cargohold", "distribution")


@dataclass(frozen=True)
class Client:
    """How a part pulls an image, and how its rows say so."""
    pull: Callable[[str, str, pull.Image], pull.Pull]   # (base_url, name, image) -> one timed pull
    does: str                                           # what one pull does, in the first row's note
    prefix: str = ""                                    # before every metric name of the part


CURL = Client(pull.pull, f"{LAYERS} layers + config, 3 curl downloads at a time")


def add_arguments(ap) -> None:
    pulls = "pull, pull_link, pull_client"
    ap.add_argument("--rounds", type=int,
                    help=f"{pulls}: rounds, rotating the order of the sides (default 3; --quick 1)")
    ap.add_argument("--warm-pulls", type=int, default=3, help=f"{pulls}: warm pulls per cache per round (default 3)")
    ap.add_argument("--layer-mib", type=int, help=f"{pulls}: size of each of the 5 layers (default 40; --quick 8)")
    ap.add_argument("--link-rate", type=float, default=50.0,
                    help="pull_link: the upstream link's bandwidth in MB/s, shared by all connections (default 50)")
    ap.add_argument("--pulls", type=int, help="upstream_requests: pulls counted per ttl case (default 100; --quick 20)")
    ap.add_argument("--expired-ttl", type=float, default=1.0,
                    help="upstream_requests: ttl in seconds of the repository whose tag expires "
                         "before every pull (default 1; 0 = no pause)")


def prepare(ctx) -> None:
    for tool in ("curl", launch.ETCD_BIN, launch.PEER_BIN):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    layer = (ctx.args.layer_mib or (8 if ctx.quick else 40)) * MiB
    content = ctx.base / "content"
    t0 = time.perf_counter()
    ctx.image = pull.make_image(content, "library/bench", "v1", [layer] * LAYERS, seed=14_000)
    ctx.small = pull.make_image(content, "library/small", "v1", [64 * 1024] * LAYERS, seed=14_100)
    ctx.upstream = DistributionProcess(ctx.base / "upstream")
    ctx.upstream.start()
    for image in (ctx.image, ctx.small):
        pull.push(ctx.upstream.url, image)
    ctx.log(f"upstream {ctx.upstream.url}: {ctx.image.name}:{ctx.image.tag} "
            f"({ctx.image.size / MiB:.1f} MiB) and {ctx.small.name}:{ctx.small.tag} pushed "
            f"({time.perf_counter() - t0:.1f}s, not timed)")
    ctx.details |= {"errors": {}, "image": _describe(ctx.image), "small_image": _describe(ctx.small)}


def finish(ctx) -> None:
    if getattr(ctx, "upstream", None) is not None:
        ctx.upstream.stop()


def _describe(image: pull.Image) -> dict:
    return {"name": image.name, "tag": image.tag, "digest": image.digest, "bytes": image.size,
            "layers": [b.size for b in image.layers]}


# =========================================================================== the processes

@contextlib.contextmanager
def cache_node(ctx, upstream_url: str, repositories: dict[str, str]):
    """A fresh one-node cluster (its own etcd) whose remote repositories (name -> ttl) all cache
    `upstream_url`. They are defined with the CLI before the node starts, so the node's read model
    holds them when it is ready. Yields the node and the pids whose CPU is the cache's (the node
    and its etcd). All its data is deleted afterwards (the disk is shared)."""
    workdir = Path(tempfile.mkdtemp(prefix="cache-", dir=ctx.base))
    try:
        with launch.Cluster(workdir, "pullthrough") as cluster:
            for name, ttl in repositories.items():
                r = cluster.cli("repo", "add", name, "--remote", upstream_url, "--ttl", ttl)
                if r.returncode != 0:
                    said = (r.stderr or r.stdout).strip().splitlines() or ["(nothing)"]
                    raise RuntimeError(f"cargohold repo add {name} failed: {said[-1][:300]}")
            node = cluster.add("n1")
            yield node, [node.pid, cluster.etcd.pid]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def distribution_proxy(ctx, upstream_url: str):
    """A fresh Distribution in proxy mode in front of `upstream_url`; its data deleted afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="proxy-", dir=ctx.base))
    proxy = launch.DistributionProxy(workdir / "data", upstream_url)
    try:
        yield proxy.start()
    finally:
        proxy.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class UpstreamLog:
    """What the upstream was asked for one image since the last look, from its own access log."""

    def __init__(self, upstream: DistributionProcess, image: pull.Image):
        self.upstream, self.path = upstream, f"/v2/{image.name}/"
        self.seen = len(self.upstream.requests(self.path))

    def since_last(self) -> collections.Counter:
        """Counts by "METHOD manifest|blob" of the requests logged since the previous call."""
        new = self.upstream.requests(self.path)[self.seen:]
        self.seen += len(new)
        return collections.Counter(f"{r.method} {_kind(r.path)}" for r in new)


def _kind(path: str) -> str:
    return "manifest" if "/manifests/" in path else "blob" if "/blobs/" in path else "other"


# =========================================================================== pull

def _pull_record(p: pull.Pull) -> dict:
    """What one pull measured (curl: time to first byte and cache headers; skopeo: its own CPU)."""
    record = {"seconds": p.seconds, "MBps": p.mb_per_s, "first_byte_s": p.first_byte_s,
              "cache": dict(p.cache), "client_cpu_s": p.client_cpu_s}
    return {k: v for k, v in record.items() if v is not None and v != {}}


@contextlib.contextmanager
def cpu_meter(pids: list[int], into: dict, key: str):
    """CPU seconds (user + sys) the processes `pids` and their children spent in the block."""
    def used() -> float:
        return sum(sum(procs.tree_cpu(pid)) for pid in pids)
    before = used()
    yield
    into[key] = used() - before


@contextlib.contextmanager
def profiler(ctx, when: str, pid: int | None):
    """py-spy on the cargohold node while the block runs (with --profile); summaries in the JSON."""
    with Profiler(ctx.pyspy if pid else None, ctx.profile_dir, f"pull-{when}") as prof:
        prof.add("node", pid)
        yield
    ctx.details.setdefault("profiles", []).extend({"when": when, **v} for v in prof.summaries.values())


def pull_from_cache(ctx, base_url: str, name: str, pids: list[int], client: Client,
                    profiled: int | None = None) -> dict:
    """Cold pull, content check, warm pulls; each timed pull's upstream requests and the cache's
    CPU seconds counted. With --profile, py-spy records the process `profiled` during each."""
    image, log, cpu = ctx.image, UpstreamLog(ctx.upstream, ctx.image), {}
    with profiler(ctx, "cold", profiled), cpu_meter(pids, cpu, "cold"):
        cold = client.pull(base_url, name, image)
    cold_upstream = log.since_last()
    pull.verify(base_url, name, image)
    log.since_last()                       # a check's requests (there should be none) are not a pull's
    with profiler(ctx, "warm", profiled), cpu_meter(pids, cpu, "warm"):
        warm = [client.pull(base_url, name, image) for _ in range(ctx.args.warm_pulls)]
    return {"cold": _pull_record(cold), "warm": [_pull_record(p) for p in warm],
            "upstream_cold": dict(cold_upstream), "upstream_warm": dict(log.since_last()),
            "cpu_s_per_GB": {"cold": cpu["cold"] / (image.size / 1e9),
                             "warm": cpu["warm"] / (len(warm) * image.size / 1e9)}}


def direct_side(ctx, upstream_url: str, client: Client) -> dict:
    cpu = {}
    with cpu_meter([ctx.upstream.pid], cpu, "upstream"):
        pulls = [client.pull(upstream_url, ctx.image.name, ctx.image) for _ in range(1 + ctx.args.warm_pulls)]
    return {"pulls": [_pull_record(p) for p in pulls],
            "upstream_cpu_s_per_GB": cpu["upstream"] / (len(pulls) * ctx.image.size / 1e9)}


def cargohold_side(ctx, upstream_url: str, client: Client) -> dict:
    with cache_node(ctx, upstream_url, {REMOTE: CACHE_TTL}) as (node, pids):
        return pull_from_cache(ctx, node.url, f"{REMOTE}/{ctx.image.name}", pids, client, profiled=node.pid)


def distribution_side(ctx, upstream_url: str, client: Client) -> dict:
    with distribution_proxy(ctx, upstream_url) as proxy:
        return pull_from_cache(ctx, proxy.url, ctx.image.name, [proxy.pid], client)


MEASURE = {"direct": direct_side, "cargohold": cargohold_side, "distribution": distribution_side}


def _summary(result: dict) -> str:
    """One log line for one side's round."""
    if "pulls" in result:
        return ("MB/s " + "/".join(f"{p['MBps']:,.0f}" for p in result["pulls"])
                + f"; upstream CPU {result['upstream_cpu_s_per_GB']:.2f} s/GB")
    cold, cpu = result["cold"], result["cpu_s_per_GB"]
    warm = "/".join(f"{p['MBps']:,.0f}" for p in result["warm"])
    timing = (f"{cold['cache'] or ''} (first byte of every blob within {cold['first_byte_s']:.2f}s of "
              f"{cold['seconds']:.2f}s)" if "first_byte_s" in cold else f"({cold['seconds']:.2f}s)")
    return (f"cold {cold['MBps']:,.0f} MB/s {timing}, warm {warm} MB/s; "
            f"cache CPU {cpu['cold']:.2f}/{cpu['warm']:.2f} s/GB cold/warm; "
            f"upstream asked cold {result['upstream_cold']}, warm {result['upstream_warm']}")


def pull_part(ctx) -> list[Row]:
    return pull_rounds(ctx, "pull", ctx.upstream.url)


def pull_link_part(ctx) -> list[Row]:
    with Link(ctx.upstream.port, ctx.args.link_rate) as link:
        ctx.log(f"[pull_link] the upstream through a {ctx.args.link_rate:g} MB/s link: {link.url}")
        return pull_rounds(ctx, "pull_link", link.url)


def pull_client_part(ctx) -> list[Row]:
    """`pull` with skopeo doing each whole pull (to disk) instead of curl (into /dev/null)."""
    if reason := skopeo.missing():
        ctx.log(f"[pull_client] skipped: {reason}")
        return [Row("pull_client", "(part skipped)", "skipped", note=reason)]
    client = Client(functools.partial(skopeo.pull, scratch=ctx.base / "skopeo"),
                    f"{LAYERS} layers + config, each pull a whole {skopeo.describe()}: what users see. "
                    "The data path alone is the `pull` part (curl into /dev/null)", prefix="skopeo: ")
    rows = pull_rounds(ctx, "pull_client", ctx.upstream.url, client)
    return rows + [_client_cpu_row(ctx, "pull_client", ctx.details["pull_client"])]


def pull_rounds(ctx, part: str, upstream_url: str, client: Client = CURL) -> list[Row]:
    """Every side once per round, in rotating order, each reaching the upstream at `upstream_url`
    and pulled by `client`."""
    rounds = ctx.args.rounds or (1 if ctx.quick else 3)
    results: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rnd in range(rounds):
        for side in SIDES[rnd % 3:] + SIDES[:rnd % 3]:
            tag = f"[{part}] {side} round {rnd + 1}/{rounds}"
            try:
                results[side].append(MEASURE[side](ctx, upstream_url, client))
                ctx.log(f"{tag}: {_summary(results[side][-1])}")
            except Exception as e:  # noqa: BLE001 - one side failing must not hide the others
                ctx.log(f"{tag}: FAILED: {type(e).__name__}: {e}")
                ctx.details["errors"].setdefault(part, {})[side] = f"{type(e).__name__}: {e}"[:300]
    ctx.details[part] = results
    rows = _speed_rows(ctx, part, results, rounds, client) + _cost_rows(ctx, part, results, client)
    if client is CURL and upstream_url == ctx.upstream.url and results["direct"]:
        rows.append(_ceiling_row(ctx, part, results))
    return rows


def _ceiling_row(ctx, part: str, results: dict[str, list[dict]]) -> Row:
    """The best cold-vs-direct ratio any digest-verifying cache could reach here (bench/ceiling.py),
    from costs measured now; cargohold's own cold speed is in the first row."""
    layer = max(ctx.image.layers, key=lambda b: b.size)
    limit = ceiling.measure(f"{ctx.upstream.url}/v2/{ctx.image.name}/blobs/{layer.digest}", layer.size,
                            layer.path.read_bytes(),
                            median(r["upstream_cpu_s_per_GB"] for r in results["direct"]))
    direct = median(p["MBps"] for r in results["direct"] for p in r["pulls"])
    ctx.details.setdefault("ceiling", {})[part] = {**limit.__dict__, "MBps": limit.mb_per_s}
    return compared(part, "ceiling of any digest-verifying cache here vs direct (info)", "MB/s", limit.mb_per_s,
                    direct, note=f"{limit.describe()}: every core busy and no other work; the cache's "
                                 "send costed as the upstream's sendfile")


def _errors_of(ctx, part: str, *sides: str) -> str:
    """The failures of these sides in this part, one line each."""
    errors = ctx.details["errors"].get(part, {})
    return "; ".join(f"{s}: {errors[s]}" for s in sides if s in errors)


def _speed_rows(ctx, part: str, results: dict[str, list[dict]], rounds: int, client: Client) -> list[Row]:
    """The issue's three ratios, Distribution's own cold ratio, and the streaming evidence (when
    the client measures a first byte)."""
    vs_direct = _errors_of(ctx, part, "cargohold", "direct")
    vs_proxy = _errors_of(ctx, part, "cargohold", "distribution")
    direct = median(p["MBps"] for r in results["direct"] for p in r["pulls"])
    cold = {s: median(r["cold"]["MBps"] for r in results[s]) for s in SIDES[1:]}
    warm = {s: median(p["MBps"] for r in results[s] for p in r["warm"]) for s in SIDES[1:]}
    first_byte = {s: median(r["cold"].get("first_byte_s") for r in results[s]) for s in SIDES[1:]}
    headers = {when: sum((collections.Counter(p.get("cache", {})) for r in results["cargohold"]
                          for p in ([r["cold"]] if when == "cold" else r["warm"])), collections.Counter())
               for when in ("cold", "warm")}
    headers_seen = {when: f"; X-Cargohold-Cache over the {when} pulls: {dict(headers[when])}"
                    if headers[when] else "" for when in ("cold", "warm")}
    size = f"{ctx.image.size / MiB:.0f} MiB image, {client.does}"
    rows = [
        compared(part, f"{client.prefix}cold, cargohold vs direct from the upstream", "MB/s", cold["cargohold"],
                 direct, min_ratio=0.9, error=vs_direct,
                 note=f"{size}; median of {rounds} cold pulls (a fresh cluster each) vs "
                      f"{rounds * (1 + ctx.args.warm_pulls)} direct pulls{headers_seen['cold']}"),
        compared(part, f"{client.prefix}cold, cargohold vs Distribution proxy cold", "MB/s", cold["cargohold"],
                 cold["distribution"], min_ratio=1.0, error=vs_proxy,
                 note=f"median of {rounds} each; Distribution 2.8.2 with proxy.remoteurl, fresh each round"),
        compared(part, f"{client.prefix}warm, cargohold vs Distribution proxy warm", "MB/s", warm["cargohold"],
                 warm["distribution"], min_ratio=1.0, error=vs_proxy,
                 note=f"median of {rounds * ctx.args.warm_pulls} each{headers_seen['warm']}"),
        compared(part, f"{client.prefix}cold, Distribution proxy vs direct (info)", "MB/s", cold["distribution"],
                 direct, error=_errors_of(ctx, part, "distribution", "direct")),
    ]
    if any(first_byte.values()):
        rows.append(compared(part, f"{client.prefix}cold pull: the slowest blob's first byte", "s",
                             first_byte["cargohold"], first_byte["distribution"], error=vs_proxy,
                             note="curl's time_starttransfer, median over the cold pulls: far below the pull's "
                                  "time when the cache streams while it fills"))
    return rows


def _cost_rows(ctx, part: str, results: dict[str, list[dict]], client: Client) -> list[Row]:
    """CPU per GB and upstream requests per pull, cargohold vs Distribution's proxy."""
    vs_proxy = _errors_of(ctx, part, "cargohold", "distribution")
    cpu = {when: {s: median(r["cpu_s_per_GB"][when] for r in results[s]) for s in SIDES[1:]}
           for when in ("cold", "warm")}
    asked = {s: {when: _median_requests(results[s], when) for when in ("upstream_cold", "upstream_warm")}
             for s in SIDES[1:]}
    return [
        compared(part, f"{client.prefix}cache CPU per GB, cold pull", "cpu-s/GB", cpu["cold"]["cargohold"],
                 cpu["cold"]["distribution"], error=vs_proxy,
                 note="user+sys of the cache's processes (cargohold: node and its etcd); lower is better; "
                      "the upstream's own CPU per GB on direct pulls: "
                      f"{median(r['upstream_cpu_s_per_GB'] for r in results['direct']) or 0:.2f}"),
        compared(part, f"{client.prefix}cache CPU per GB, warm pull", "cpu-s/GB", cpu["warm"]["cargohold"],
                 cpu["warm"]["distribution"], error=vs_proxy),
        compared(part, f"{client.prefix}upstream requests per cold pull", "requests",
                 _total(asked["cargohold"]["upstream_cold"]), _total(asked["distribution"]["upstream_cold"]),
                 error=vs_proxy,
                 note=f"cargohold {asked['cargohold']['upstream_cold']}, "
                      f"Distribution {asked['distribution']['upstream_cold']} (median per round)"),
        compared(part, f"{client.prefix}upstream requests per warm pull", "requests",
                 _total(asked["cargohold"]["upstream_warm"]), _total(asked["distribution"]["upstream_warm"]),
                 error=vs_proxy,
                 note=f"over {ctx.args.warm_pulls} warm pulls per round, per pull: cargohold "
                      f"{asked['cargohold']['upstream_warm']}, Distribution {asked['distribution']['upstream_warm']}"),
    ]


def _client_cpu_row(ctx, part: str, results: dict[str, list[dict]]) -> Row:
    """The pulling client's own CPU per GB (information: the same client on every side)."""
    pulls = {"direct": [p for r in results["direct"] for p in r["pulls"]]}
    for side in SIDES[1:]:
        pulls[f"{side} cold"] = [r["cold"] for r in results[side]]
        pulls[f"{side} warm"] = [p for r in results[side] for p in r["warm"]]
    per_gb = ctx.image.size / 1e9
    cpu = {group: median(p["client_cpu_s"] / per_gb for p in of) for group, of in pulls.items()}
    every = median(p["client_cpu_s"] / per_gb for of in pulls.values() for p in of)
    return Row(part, "skopeo: the client's own CPU per GB pulled (info)", every, "cpu-s/GB",
               note="user+sys of the skopeo process, median over every pull; per kind of pull: "
                    + ", ".join(f"{group} {fmt(v)}" for group, v in cpu.items()))


def _median_requests(results: list[dict], when: str) -> dict[str, float] | None:
    """Per kind of upstream request, the median over rounds of its count per pull (None: no round)."""
    if not results:
        return None
    pulls = (lambda r: 1) if when == "upstream_cold" else (lambda r: max(1, len(r["warm"])))
    kinds = sorted({k for r in results for k in r[when]})
    return {k: median(r[when].get(k, 0) / pulls(r) for r in results) for k in kinds}


def _total(counts: dict[str, float] | None) -> float | None:
    return None if counts is None else sum(counts.values())


# =========================================================================== upstream_requests

def upstream_requests(ctx) -> list[Row]:
    n = ctx.args.pulls or (20 if ctx.quick else 100)
    ttl = ctx.args.expired_ttl
    with cache_node(ctx, ctx.upstream.url, {REMOTE: CACHE_TTL, EXPIRED: f"{ttl:g}s"}) as (node, _):
        within = counted_pulls(ctx, node.url, REMOTE, n, pause=0.0)
        expired = counted_pulls(ctx, node.url, EXPIRED, n, pause=ttl + 0.25 if ttl else 0.0)
    ctx.details["upstream_requests"] = {"pulls": n, "expired_ttl": ttl, "within_ttl": within, "expired": expired}
    heads = expired["upstream"].get("HEAD manifest", 0)
    return [
        Row("upstream_requests", f"within ttl ({CACHE_TTL}): upstream requests per {n} pulls",
            sum(within["upstream"].values()), "requests", target="0",
            passed=not within["upstream"],
            note=f"{within['upstream'] or 'none'}; X-Cargohold-Cache: {within['cache']}"),
        Row("upstream_requests", f"ttl ({ttl:g}s) expired before each pull: upstream requests per {n} pulls",
            sum(expired["upstream"].values()), "requests", target=f"{n} HEAD, nothing else",
            passed=expired["upstream"] == {"HEAD manifest": n},
            note=f"{expired['upstream']} ({heads / n:.2f} HEAD per pull); X-Cargohold-Cache: {expired['cache']}"),
    ]


def counted_pulls(ctx, base_url: str, repository: str, n: int, pause: float) -> dict:
    """One pull of the small image that fills the cache, then `n` counted pulls, each after
    `pause` seconds: the upstream's requests (from its log) and the cache headers over the `n`."""
    name = f"{repository}/{ctx.small.name}"
    pull.pull(base_url, name, ctx.small)
    log = UpstreamLog(ctx.upstream, ctx.small)
    cache = collections.Counter()
    for _ in range(n):
        time.sleep(pause)
        cache += pull.pull(base_url, name, ctx.small).cache
    result = {"upstream": dict(log.since_last()), "cache": dict(cache)}
    ctx.log(f"[upstream_requests] {n} pulls of {name}, {pause:g}s apart: upstream asked "
            f"{result['upstream'] or 'nothing'}; X-Cargohold-Cache {result['cache']}")
    return result


PARTS = {"pull": pull_part, "pull_link": pull_link_part, "pull_client": pull_client_part,
         "upstream_requests": upstream_requests}
