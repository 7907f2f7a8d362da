"""Virtual repositories (issue 15): manifest GET and blob pull through a virtual name vs the member directly.

One node with its own etcd; `dev` is a virtual repository over three local namespaces,
`team-a,team-b,team-c`, defined with `cargohold repo add dev --virtual` before the node starts.
The peer of every row is the same request sent to the member that holds the content, on the
same node in the same run (`direct`), measured back to back, alternating which goes first. A
target is judged on the median of the paired ratios (a wrk run of each side per round; a blob
pull of each per pair): each compares two measurements seconds apart, so the shared machine's
slow swings cancel. The table's ratio column is of the medians.

    manifest_get  an image in the first member (`team-a/first:latest`) and one in the third
                  (`team-c/third:latest`, so `team-a/third` and `team-b/third` miss first).
                  Checked first: the virtual GET returns the member's bytes and its
                  X-Cargohold-Member header names that member. Then per round and case:
                  `wrk -t2 -c16 -d5s` (bench/scenarios/manifest_get.lua) on
                  /v2/dev/<image>/manifests/latest and on /v2/team-?/<image>/manifests/latest,
                  node on cpu 0 and wrk on cpu 1 (as `registry`'s pinned manifest_get).
                  Targets: first member >= 0.9x, third member >= 0.8x.
    blob_pull     a 256 MiB blob of random bytes in the third member only (`team-c/big`);
                  sha256 checked once through the virtual name (untimed), then per round 4
                  pairs of `curl -o /dev/null`, one through each name, alternating which goes
                  first. Target >= 0.95x, judged on the median of the pairs' ratios.
    in_process    the manifest GETs of manifest_get through the node's ASGI app called directly
                  (thread CPU time per call, best of 5 x 10,000; the read model follows etcd as
                  on a node, without read barriers: a lone caller would pay one etcd round trip
                  per call, which concurrent requests share on a node, and both sides pay the
                  same): what resolving a virtual name adds per request, independent of how
                  busy the machine is. Information.

--rounds N (default 10; --quick 1), --seconds S (wrk, default 5); --quick: 3 s wrk runs, a 32 MiB
blob, 2,000 calls. Needs wrk, curl, taskset and etcd on PATH. Results: the "Virtual repositories"
section of bench/RESULTS.md."""

from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench import launch, oci
from bench.report import Row, compared, median
from bench.scenarios.registry import CpuMeter, cpu_plan, curl_get, profiled, run_wrk

MiB = 1 << 20
MB = 1_000_000
PEER = "direct"
VIRTUAL = "dev"
MEMBERS = ("team-a", "team-b", "team-c")
MEMBER_HEADER = "X-Cargohold-Member"
SIDES = ("virtual", "direct")


@dataclass(frozen=True)
class Case:
    """One image read through `dev/<image>` and directly from `<member>/<image>`."""
    label: str
    member: str
    image: str
    min_ratio: float

    @property
    def direct(self) -> str:
        return f"{self.member}/{self.image}"

    @property
    def virtual(self) -> str:
        return f"{VIRTUAL}/{self.image}"

    def repo(self, side: str) -> str:
        return self.virtual if side == "virtual" else self.direct


MANIFEST_CASES = (Case("first member", "team-a", "first", 0.9),
                  Case("third member", "team-c", "third", 0.8))
BLOB_CASE = Case("third member", "team-c", "big", 0.95)


def add_arguments(ap) -> None:
    ap.add_argument("--rounds", type=int, help="rounds, alternating which side goes first (default 10; --quick 1)")
    ap.add_argument("--seconds", type=int, help="manifest_get: seconds per wrk run (default 5; --quick 3)")
    ap.add_argument("--no-pin", action="store_true",
                    help="manifest_get: don't pin the node and wrk to separate cores")


def prepare(ctx) -> None:
    for tool in ("wrk", "curl", "taskset", launch.ETCD_BIN):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")


def _rounds(ctx) -> int:
    return max(1, ctx.args.rounds or (1 if ctx.quick else 10))


def _sides_in_order(rnd: int) -> tuple[str, ...]:
    return SIDES if rnd % 2 == 0 else SIDES[::-1]


@contextlib.contextmanager
def virtual_node(ctx, cpus: str | None = None):
    """A fresh one-node cluster (its own etcd) where `dev` is defined over MEMBERS before the node
    starts, so its read model holds the definition when it is ready. The node runs on `cpus`
    (its etcd is not pinned: it is idle while the node answers from its read model). Everything
    is deleted afterwards (the disk is shared)."""
    workdir = Path(tempfile.mkdtemp(prefix="virtual-", dir=ctx.base))
    try:
        with launch.Cluster(workdir, "virtual") as cluster:
            r = cluster.cli("repo", "add", VIRTUAL, "--virtual", "--members", ",".join(MEMBERS))
            if r.returncode != 0:
                said = (r.stderr or r.stdout).strip().splitlines() or ["(nothing)"]
                raise RuntimeError(f"cargohold repo add {VIRTUAL} --virtual failed: {said[-1][:300]}")
            node = cluster.node("n1")
            node.cpus = cpus
            node.start()
            ctx.log(f"node {node.url} pid {node.pid} (cpus {cpus or 'any'}) ready in {node.last_ready_s:.2f}s")
            yield node
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _expect_member(r, case: Case) -> None:
    """The virtual answer must come from the member the case put the content in."""
    served_by = r.headers.get(MEMBER_HEADER)
    if served_by != case.direct:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: {MEMBER_HEADER} {served_by!r}, "
                           f"expected {case.direct!r}")


# =========================================================================== manifest_get

def _seed_manifest(c, case: Case) -> int:
    """Push the case's image into its member; check the virtual GET answers the same bytes from
    that member. Returns the manifest's size."""
    body, _ = oci.push_image(c, case.direct, "latest")
    for side in SIDES:
        r = oci.get_manifest(c, case.repo(side), "latest")
        if r.content != body:
            raise oci.RegistryError(f"GET {case.repo(side)}:latest returned other bytes")
        if side == "virtual":
            _expect_member(r, case)
    return len(body)


def _wrk(node, case: Case, side: str, seconds: int, cpus: str | None, min_bytes: int) -> dict:
    """One checked wrk run on the case's manifest through `side`, with the node's CPU time."""
    cpu = CpuMeter(node)
    with cpu:
        res = run_wrk(node.url, seconds, cpus, path=f"/v2/{case.repo(side)}/manifests/latest")
    bad = {k: v for k, v in res["errors"].items() if v}
    if bad:
        raise RuntimeError(f"{side} {case.label}: wrk saw errors {bad} (non-2xx are 'status')")
    if res["bytes"] / max(res["requests"], 1) < min_bytes:
        raise RuntimeError(f"{side} {case.label}: responses shorter than the manifest ({min_bytes} bytes)")
    res["node_cpu_s"] = cpu.total
    res["node_cpu_ms_per_1k"] = 1e6 * cpu.total / max(res["requests"], 1)
    return res


def manifest_get(ctx) -> list[Row]:
    seconds = ctx.args.seconds or (3 if ctx.quick else 5)
    srv_cpus, wrk_cpus = (None, None) if ctx.args.no_pin else cpu_plan(ctx)
    pin_note = f"node on cpu {srv_cpus}, wrk on cpu {wrk_cpus}" if srv_cpus else "nothing pinned"
    runs = {c.label: {s: [] for s in SIDES} for c in MANIFEST_CASES}
    with virtual_node(ctx, srv_cpus) as node:
        with oci.client(node.url) as c:
            sizes = {case.label: _seed_manifest(c, case) for case in MANIFEST_CASES}
        for case in MANIFEST_CASES:          # warm-up, discarded
            for side in SIDES:
                _wrk(node, case, side, 1, wrk_cpus, sizes[case.label])
        for rnd in range(_rounds(ctx)):
            for case in MANIFEST_CASES:
                for side in _sides_in_order(rnd):
                    with profiled(ctx, node, f"manifest_get-{case.image}-{side}"):
                        res = _wrk(node, case, side, seconds, wrk_cpus, sizes[case.label])
                    runs[case.label][side].append(res)
                    ctx.log(f"[manifest_get] round {rnd + 1}/{_rounds(ctx)} {case.label} {side}: "
                            f"{res['rps']:,.0f} req/s, p99 {res['latency_us']['p99'] / 1000:.2f} ms, "
                            f"node CPU {res['node_cpu_ms_per_1k']:.0f} ms per 1k requests")
    ctx.details["manifest_get"] = runs
    return [row for case in MANIFEST_CASES
            for row in _manifest_rows(case, runs[case.label], seconds, pin_note, _rounds(ctx))]


def _manifest_rows(case: Case, runs: dict[str, list[dict]], seconds: int, pin_note: str,
                   rounds: int) -> list[Row]:
    def med(value) -> dict[str, float | None]:
        return {s: median(value(r) for r in runs[s]) for s in SIDES}

    rps = {s: [r["rps"] for r in runs[s]] for s in SIDES}
    return [
        _judged("manifest_get", f"GET by tag, {case.label}", "req/s", rps, case.min_ratio,
                f"{case.virtual} vs {case.direct}; wrk -t2 -c16 -d{seconds}s x {rounds} rounds; {pin_note}"),
        _compared("manifest_get", f"p99 latency, {case.label}", "ms",
                  med(lambda r: r["latency_us"]["p99"] / 1000), note="lower is better"),
        _compared("manifest_get", f"node CPU per 1k GETs, {case.label}", "cpu-ms",
                  med(lambda r: r["node_cpu_ms_per_1k"]),
                  note="user+sys of the node process; lower is better; steadier than req/s"),
    ]


def _compared(benchmark: str, metric: str, unit: str, by_side: dict, **kw) -> Row:
    """A row of the virtual side with the direct side as its same-run peer."""
    return compared(benchmark, metric, unit, by_side["virtual"], by_side["direct"], **kw)


def _judged(benchmark: str, metric: str, unit: str, per_round: dict[str, list[float]],
            min_ratio: float, note: str) -> Row:
    """Medians of both sides, judged on the median of the paired ratios virtual / direct (the
    lists are in measurement order: element i of one side was measured next to element i of the other)."""
    ratios = [v / d for v, d in zip(per_round["virtual"], per_round["direct"])]
    judged = median(ratios)
    spread = (", ".join(f"{r:.2f}" for r in ratios) if len(ratios) <= 12 else
              "quartiles " + " / ".join(f"{x:.2f}" for x in statistics.quantiles(ratios, n=4)))
    row = _compared(benchmark, metric, unit, {s: median(per_round[s]) for s in SIDES},
                    note=f"{note}; median of the {len(ratios)} paired ratios {judged:.3f} (judged; the ratio "
                         f"column is of the medians); {spread}")
    row.target, row.passed = f">= {min_ratio:g}x", judged >= min_ratio
    return row


# =========================================================================== blob_pull

def blob_pull(ctx) -> list[Row]:
    size = (32 if ctx.quick else 256) * MiB
    pulls = 4           # pairs per round: one pull through each name, the order alternating
    case = BLOB_CASE
    path = ctx.base / f"blob-{size // MiB}MiB"
    digest = oci.make_file(path, size, 15_000)
    runs: dict[str, list[list[float]]] = {s: [] for s in SIDES}     # MB/s of each pull, per round
    with virtual_node(ctx) as node:
        url = {s: f"{node.url}/v2/{case.repo(s)}/blobs/{digest}" for s in SIDES}
        cpu = {s: CpuMeter(node) for s in SIDES}
        with oci.client(node.url) as c:
            oci.push_blob_file_monolithic(c, case.direct, path, digest)
            oci.verify_blob(c, case.virtual, digest, size)     # untimed; also warms the page cache
            _expect_member(c.head(f"/v2/{case.virtual}/blobs/{digest}"), case)
        for rnd in range(_rounds(ctx)):
            for side in SIDES:
                runs[side].append([])
            for pair in range(pulls):
                for side in _sides_in_order(rnd + pair):
                    with cpu[side]:
                        runs[side][-1] += [size / MB / s for s in curl_get(url[side], size)]
            ctx.log(f"[blob_pull] round {rnd + 1}/{_rounds(ctx)}: MB/s " + "; ".join(
                f"{side} " + "/".join(f"{x:,.0f}" for x in runs[side][-1]) for side in SIDES))
        for side in SIDES:      # with --profile: a few pulls more per side, not counted
            with profiled(ctx, node, f"blob_pull-{side}"):
                if ctx.pyspy:
                    curl_get(url[side], size, 5)
    path.unlink(missing_ok=True)
    ctx.details["blob_pull"] = runs | {"cpu": {s: m.as_dict() for s, m in cpu.items()}}
    gb = _rounds(ctx) * pulls * size / 1e9
    return [
        _judged("blob_pull", f"pull {size // MiB} MiB, {case.label}", "MB/s",
                {s: [x for pulls_of_round in runs[s] for x in pulls_of_round] for s in SIDES}, case.min_ratio,
                f"{case.virtual} vs {case.direct}; curl -o /dev/null; {_rounds(ctx)} rounds of {pulls} pairs "
                f"of pulls, one through each name, the order alternating; medians of all pulls"),
        _compared("blob_pull", "node CPU per GB pulled", "cpu-s/GB",
                  {s: cpu[s].total / gb for s in SIDES}, note="user+sys of the node process; lower is better"),
    ]


# =========================================================================== in_process

def in_process(ctx) -> list[Row]:
    calls = 2000 if ctx.quick else 10_000
    with virtual_node(ctx) as node:
        with oci.client(node.url) as c:
            for case in MANIFEST_CASES:
                _seed_manifest(c, case)
        node.stop()          # its etcd and data stay; the app below reads them
        us = anyio.run(_asgi_cpu_per_get, node.etcd_url, node.cluster, node.data_dir, calls, backend="asyncio")
    ctx.details["in_process"] = us
    return [_compared("in_process", f"thread CPU per GET, {case.label}", "us",
                      {s: us[case.label][s] for s in SIDES},
                      note=f"+{us[case.label]['virtual'] - us[case.label]['direct']:.1f} us per GET through "
                           f"{case.virtual}; best of 5 x {calls:,} calls of the ASGI app")
            for case in MANIFEST_CASES]


async def _asgi_cpu_per_get(etcd_url: str, cluster: str, data_dir: Path, calls: int) -> dict:
    """Microseconds of thread CPU per manifest GET through the ASGI app, for each case and side.
    There is no public factory for the app: it is built from the node's classes, as
    auth_overhead's in_process does (the other place where the bench reaches inside the node)."""
    from cargohold.blobs.store import FilesystemBlobStore
    from cargohold.coordinator.etcd import EtcdClient
    from cargohold.coordinator.metadata import ClusterMetadata
    from cargohold.node.api import RegistryAPI
    from cargohold.node.uploads import UploadManager

    logging.getLogger("cargohold").setLevel(logging.WARNING)
    async with EtcdClient([etcd_url]) as client, anyio.create_task_group() as tg:
        metadata = ClusterMetadata(client, cluster, "bench-in-process", consistent_tag_reads=False)
        await tg.start(metadata.run)        # the read model follows etcd, as on a node
        store = FilesystemBlobStore(data_dir)
        api = RegistryAPI(metadata, store, UploadManager(data_dir / "uploads", store, "bench-in-process"))
        out: dict[str, dict[str, float]] = {}
        for case in MANIFEST_CASES:
            for side in SIDES:
                call = _asgi_get(api, f"/v2/{case.repo(side)}/manifests/latest")
                status, raw_headers = await call()
                headers = {k.decode().lower(): v.decode() for k, v in raw_headers}
                if status != 200 or (side == "virtual" and headers.get(MEMBER_HEADER.lower()) != case.direct):
                    raise RuntimeError(f"in-process GET {case.repo(side)}:latest -> {status} {headers}")
                out.setdefault(case.label, {})[side] = min([await _thread_us_per_call(call, calls) for _ in range(5)])
        tg.cancel_scope.cancel()
    return out


def _asgi_get(api, path: str):
    """A call of the app with a manifest GET of `path`; returns (status, raw header list)."""
    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "scheme": "http",
             "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"127.0.0.1"), (b"accept", oci.OCI_MANIFEST.encode())]}
    answer: dict = {}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], message.get("headers", [])

    async def call():
        await api(scope, receive, send)
        return answer.get("status"), answer.get("headers", [])
    return call


async def _thread_us_per_call(call, calls: int) -> float:
    started = time.thread_time()
    for _ in range(calls):
        await call()
    return (time.thread_time() - started) / calls * 1e6


PARTS = {
    "manifest_get": manifest_get,
    "blob_pull": blob_pull,
    "in_process": in_process,
}
