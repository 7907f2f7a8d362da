"""Harness for bench/sites.py: one etcd, nodes in sites A and B, an etcd watcher that timestamps
copies as they are published, small OCI push helpers and an optional py-spy recorder.

Imports only read-only helpers from the tree: tests/support (EtcdProcess, NodeProcess) and
cargohold.coordinator.etcd.EtcdClient. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import anyio  # noqa: E402
import anyio.from_thread  # noqa: E402

from cargohold.coordinator.etcd import EtcdClient  # noqa: E402
from tests.support.etcd import EtcdProcess  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402

MiB = 1 << 20
MB = 1_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


# --------------------------------------------------------------------------- content and pushes

def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_blob(size: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(size)


def _check(r: httpx.Response, *codes: int) -> httpx.Response:
    if r.status_code not in codes:
        raise RuntimeError(f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text[:300]}")
    return r


def manifest_bytes(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
           "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers]}
    return json.dumps(doc, separators=(",", ":")).encode()


def push_blob(c: httpx.Client, base: str, repo: str, data: bytes) -> str:
    d = digest_of(data)
    _check(c.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data,
                  headers={"Content-Type": "application/octet-stream"}), 201)
    return d


def push_manifest(c: httpx.Client, base: str, repo: str, tag: str, body: bytes) -> str:
    _check(c.put(f"{base}/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST}), 201)
    return digest_of(body)


async def apush_blob(c: httpx.AsyncClient, repo: str, data: bytes) -> str:
    d = digest_of(data)
    _check(await c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data,
                        headers={"Content-Type": "application/octet-stream"}), 201)
    return d


async def apush_manifest(c: httpx.AsyncClient, repo: str, tag: str, body: bytes) -> None:
    _check(await c.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST}), 201)


# --------------------------------------------------------------------------- disk baseline

def fsync_write_speed(directory: Path, total: int = 1024 * MiB, chunk: int = 8 * MiB) -> float:
    """MB/s of writing `total` bytes in `chunk` writes then one fsync (like
    `dd if=/dev/zero of=F bs=8M count=128 conv=fsync`), in `directory`; the file is removed."""
    path = directory / f"fsync-probe-{os.getpid()}-{time.monotonic_ns()}"
    buf = b"\0" * chunk
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < total:
            written += os.write(fd, buf[: min(chunk, total - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return total / elapsed / MB


# --------------------------------------------------------------------------- process CPU

def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a live process (all threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def scrape_metric(url: str, name: str) -> float | None:
    """Sum of a /metrics series (all label sets) of a node."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- the watcher

@dataclass
class CopyEvent:
    t: float           # time.monotonic() when the watcher received it
    kind: str          # "put" or "delete"
    digest: str
    node: str
    revision: int


class Watcher:
    """Watches `/cargohold/<cluster>/` from one etcd revision on, in a thread of its own (its own
    event loop), and timestamps (time.monotonic) every `blobs/<d>/at/<node>` and `members/<id>`
    event as it arrives. Nothing is polled; nothing is missed (the start revision is pinned)."""

    def __init__(self, etcd_url: str, cluster: str):
        self.etcd_url = etcd_url
        self.prefix = f"/cargohold/{cluster}/"
        self.cond = threading.Condition()
        self.copies: list[CopyEvent] = []
        self.holders: dict[str, set[str]] = {}
        self.first_at: dict[tuple[str, str], float] = {}
        self.member_puts: dict[str, list[float]] = {}
        self.policy_put: list[tuple[float, int]] = []
        self.probes = 0
        self.error: BaseException | None = None
        self._portal_cm = None
        self._portal = None
        self._future = None

    # lifecycle
    def start(self, node_for_probe: NodeProcess | None = None, timeout: float = 10.0) -> "Watcher":
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._future = self._portal.start_task_soon(self._run)
        # Prove the stream is live: a readiness probe writes `probes/<id>` under the prefix.
        if node_for_probe is not None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.probes == 0 and self.error is None:
                try:
                    httpx.get(node_for_probe.url + "/readyz", timeout=2)
                except httpx.HTTPError:
                    pass
                with self.cond:
                    self.cond.wait(0.2)
            if self.probes == 0:
                raise RuntimeError(f"the etcd watch did not deliver a probe within {timeout}s: {self.error!r}")
        return self

    def stop(self) -> None:
        if self._future is not None:
            self._future.cancel()
        if self._portal_cm is not None:
            try:
                self._portal_cm.__exit__(None, None, None)
            except BaseException:  # noqa: BLE001 - a cancelled watch task is the normal end
                pass
        self._portal_cm = self._portal = self._future = None

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _run(self) -> None:
        try:
            async with EtcdClient([self.etcd_url]) as client:
                start = await client.current_revision() + 1
                async with client.watch_prefix(self.prefix, start_revision=start) as watch:
                    async for batch in watch:
                        now = time.monotonic()
                        if batch.events:
                            self._apply(now, batch.events)
        except BaseException as exc:  # noqa: BLE001
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                self.error = exc
                with self.cond:
                    self.cond.notify_all()
            raise

    def _apply(self, now: float, events) -> None:
        with self.cond:
            for e in events:
                rest = e.key[len(self.prefix):]
                if rest.startswith("blobs/"):
                    digest, _, sub = rest[len("blobs/"):].partition("/")
                    rel, _, node = sub.partition("/")
                    if rel != "at" or not node:
                        continue
                    self.copies.append(CopyEvent(now, e.type, digest, node, e.mod_revision))
                    if e.type == "put":
                        self.holders.setdefault(digest, set()).add(node)
                        self.first_at.setdefault((digest, node), now)
                    else:
                        self.holders.get(digest, set()).discard(node)
                elif rest.startswith("members/") and e.type == "put":
                    self.member_puts.setdefault(rest[len("members/"):], []).append(now)
                elif rest.startswith("policies/replication") and e.type == "put":
                    self.policy_put.append((now, e.mod_revision))
                elif rest.startswith("probes/"):
                    self.probes += 1
            self.cond.notify_all()

    # queries
    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Block until `predicate()` (evaluated under the lock) holds; returns time.monotonic()."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                if self.error is not None:
                    raise RuntimeError(f"etcd watch failed: {self.error!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
                self.cond.wait(min(left, 1.0))
            return time.monotonic()

    def registered_since(self, node: str, since: float) -> float | None:
        """When `node` (re)wrote its member record at or after `since` (first such put)."""
        return next((t for t in self.member_puts.get(node, []) if t >= since), None)

    def count_in(self, digest: str, nodes: set[str]) -> int:
        return len(self.holders.get(digest, set()) & nodes)


# --------------------------------------------------------------------------- the cluster

class Sites:
    """One etcd and nodes in sites; node configs are YAML files in each data dir."""

    def __init__(self, root: Path, name: str, *, common: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.common = {"access_log": False, "log_level": "warning", **(common or {})}
        self.etcd = EtcdProcess(self.root / "etcd")
        self.nodes: dict[str, NodeProcess] = {}
        self.site_of: dict[str, str] = {}

    def start_etcd(self) -> None:
        self.etcd.start()

    def add(self, node_id: str, site: str, settings: dict | None = None) -> NodeProcess:
        data_dir = self.root / node_id
        data_dir.mkdir(parents=True, exist_ok=True)
        config = data_dir / "config.yaml"
        doc = {"site": site, **self.common, **(settings or {})}
        config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in doc.items()))
        node = NodeProcess(data_dir, etcd_url=self.etcd.url, cluster=self.name, node_id=node_id,
                           extra_args=["--config", str(config)])
        self.nodes[node_id] = node
        self.site_of[node_id] = site
        return node

    def site_nodes(self, site: str) -> set[str]:
        return {n for n, s in self.site_of.items() if s == site}

    def start(self, *node_ids: str) -> None:
        """Start nodes concurrently; returns when every one answers /readyz."""
        if len(node_ids) == 1:
            self.nodes[node_ids[0]].start()
            return
        with ThreadPoolExecutor(len(node_ids)) as pool:
            for f in [pool.submit(self.nodes[n].start) for n in node_ids]:
                f.result()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cargohold", *args, "--etcd", self.etcd.url,
                               "--cluster", self.name], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def replication_status(self) -> dict | None:
        r = self.cli("replication", "status", "--json")
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return None

    def set_replication_rules(self, rules: list[dict]) -> None:
        path = self.root / f"rules-{time.monotonic_ns()}.yaml"
        path.write_text(json.dumps({"replication": rules}))
        r = self.cli("replication", "rules", "set", str(path))
        if r.returncode != 0:
            raise RuntimeError(f"replication rules set failed: {r.stderr.strip()}")

    def stop(self) -> None:
        for node in self.nodes.values():
            try:
                node.stop(timeout=20)
            except Exception:  # noqa: BLE001
                node.kill()
        self.etcd.stop()

    def log_tails(self, lines: int = 15) -> dict[str, str]:
        return {n: node.log_tail(lines) for n, node in self.nodes.items()}


# --------------------------------------------------------------------------- py-spy

@dataclass
class Profiler:
    """`py-spy record` (raw collapsed stacks) of some node processes while a step runs."""
    pyspy: str
    out_dir: Path
    name: str
    enabled: bool = True
    idle: bool = False
    procs: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)

    def add(self, label: str, pid: int | None) -> None:
        if not self.enabled or pid is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{self.name}-{label}.txt"
        cmd = [self.pyspy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
               "--output", str(out), "--threads", "--nonblocking"]
        if self.idle:
            cmd.append("--idle")
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append((label, p, out))

    def stop(self) -> dict[str, str]:
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for label, p, out in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            if out.exists():
                self.outputs[label] = str(out)
            else:
                err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
                print(f"[profile] py-spy wrote nothing for {label}: {err[-300:]}", flush=True)
        self.procs = []
        return self.outputs


IDLE_LEAVES = ("Condition.wait (threading.py", "Event.wait (threading.py", "channel_spin (grpc/_channel.py",
               "_serve (grpc/_server.py", "select (selectors.py", "_worker (concurrent/futures")


def summarize_profile(path: str | Path, top: int = 10) -> dict:
    """From raw py-spy output (one line per distinct stack, `thread (tid): name;frame;...;frame N`):
    samples per thread group, the busiest leaf frames that are not a thread waiting (condition,
    grpc channel spin, ...), and cargohold functions by inclusive share. Shares are of all samples."""
    leaf: Counter = Counter()
    incl: Counter = Counter()
    threads: Counter = Counter()
    where: Counter = Counter()          # deepest cargohold frame -> leaf, busy or waiting alike
    total = idle = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        total += n
        thread = frames[0].partition("): ")[2] or frames[0]
        group = "AnyIO worker threads" if thread.startswith("AnyIO worker") else thread
        threads[group] += n
        last = _short(frames[-1])
        own = [f for f in frames[1:] if "cargohold/" in f and "cargohold/cli.py" not in f
               and "cargohold/__main__.py" not in f]
        if own:
            inner = _short(own[-1])
            tag = "loop" if group == "MainThread" else group
            where[f"[{tag}] " + (f"{inner} -> {last}" if own[-1] != frames[-1] else inner)] += n
        if any(frames[-1].startswith(p) or p in frames[-1] for p in IDLE_LEAVES):
            idle += n
            continue
        leaf[f"{last} [{'loop' if group == 'MainThread' else group}]"] += n
        for name in {_short(f) for f in frames[1:]
                     if "cargohold/" in f and "cargohold/cli.py" not in f and "cargohold/__main__.py" not in f}:
            incl[name] += n

    def pct(c: Counter) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in c.most_common(top)] if total else []

    return {"samples": total, "idle_share": round(100.0 * idle / total, 1) if total else 0.0,
            "threads": pct(threads), "busy_leaves": pct(leaf), "cargohold_inclusive": pct(incl),
            "cargohold_where": pct(where)}


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"
