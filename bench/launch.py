"""The one process launcher: etcd, cargohold nodes and the peer registry, on 127.0.0.1 only.

Built on `tests/support` (`EtcdProcess`, `NodeProcess`), which the test suite already uses to
start real processes: the bench adds what only benchmarks need (a chosen source tree, settings
files, CPU pinning, observation through /metrics, etcd's JSON gateway and the `cargohold` CLI).
Every process is stopped by its pid (SIGTERM, then SIGKILL), also on an error or Ctrl-C."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx

from bench import metrics, procs
from tests.support.distribution import DISTRIBUTION_BIN as PEER_BIN, distribution_config
from tests.support.etcd import EtcdProcess
from tests.support.node import NodeProcess

PYTHON = os.environ.get("CARGOHOLD_BENCH_PYTHON", sys.executable)
ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"


class Tree:
    """The tree whose `cargohold` package nodes and CLI run (`--commit`, `--source`)."""
    root: Path = procs.REPO_ROOT
    commit: str | None = None


def cli(etcd_url: str, cluster: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m cargohold ARGS --etcd URL --cluster NAME`, from the chosen tree."""
    env = dict(os.environ, PYTHONPATH=str(Tree.root), PYTHONUNBUFFERED="1")
    return subprocess.run([PYTHON, "-m", "cargohold", *args, "--etcd", etcd_url, "--cluster", cluster],
                          cwd=Tree.root, env=env, capture_output=True, text=True, timeout=timeout)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _prefix_end(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] + 1])


class Etcd(EtcdProcess):
    """A fresh etcd; read-only observation over HTTP (its /metrics and JSON gateway), which makes
    no unary gRPC request, so it never shows in the request counts the bench measures."""

    def samples(self) -> metrics.Samples:
        return metrics.scrape(self.url)

    def revision(self, samples: metrics.Samples | None = None) -> int:
        return int(metrics.value(samples or self.samples(), metrics.ETCD_REVISION))

    def range(self, key: str, *, prefix: bool = False, **extra) -> dict:
        body = {"key": _b64(key.encode()), **extra}
        if prefix:
            body["range_end"] = _b64(_prefix_end(key.encode()))
        r = httpx.post(self.url + "/v3/kv/range", json=body, timeout=30.0)
        r.raise_for_status()
        return r.json()

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (one keys-only Range)."""
        return [base64.b64decode(kv["key"]).decode() for kv in self.range(prefix, prefix=True, keys_only=True)
                .get("kvs", [])]

    def count(self, prefix: str) -> int:
        return int(self.range(prefix, prefix=True, count_only=True).get("count", 0))

    def get(self, key: str) -> bytes | None:
        kvs = self.range(key).get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def paged_keys(self, prefix: str, page: int = 5000):
        """Every key under `prefix`, `page` keys per Range request (bounded requests)."""
        start, end = prefix.encode(), _b64(_prefix_end(prefix.encode()))
        while True:
            doc = self.range(start.decode(), range_end=end, keys_only=True, limit=page)
            keys = [base64.b64decode(kv["key"]) for kv in doc.get("kvs") or []]
            yield from (k.decode() for k in keys)
            if not doc.get("more") or not keys:
                return
            start = keys[-1] + b"\0"

    def values(self, prefix: str) -> list[bytes]:
        return [base64.b64decode(kv.get("value", "")) for kv in self.range(prefix, prefix=True).get("kvs") or []]


class Node(NodeProcess):
    """`python -m cargohold serve` from the chosen tree, with `settings` in a config file, on the
    CPUs `cpus` (taskset) when given. Without `etcd_url` the node starts its private etcd."""
    kind = "cargohold"

    def __init__(self, data_dir: Path, *, settings: dict | None = None, cpus: str | None = None, **kw):
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        config = data_dir.parent / f"{data_dir.name}.yaml"
        config.write_text(json.dumps(settings or {}))          # JSON is YAML
        kw["extra_args"] = ["--config", str(config), *kw.get("extra_args", ())]
        super().__init__(data_dir, source_dir=Tree.root, python=PYTHON, **kw)
        self.cpus = cpus
        self.last_ready_s = 0.0

    def pinned(self, command: list[str]) -> list[str]:
        """`command` under `taskset -c CPUS` when the node has CPUs of its own."""
        return (["taskset", "-c", self.cpus] if self.cpus else []) + command

    def command(self) -> list[str]:
        return self.pinned(super().command())

    def start(self, timeout: float = 120.0) -> "Node":
        t0 = time.perf_counter()
        super().start(timeout)
        self.last_ready_s = time.perf_counter() - t0
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """Also stops what the node left running (its private etcd), by pid."""
        children = procs.descendants_of(self.pid) if self.alive() else []
        code = super().stop(timeout)
        procs.stop_pids(children)
        return code

    def samples(self, client: httpx.Client | None = None) -> metrics.Samples:
        return metrics.scrape(self.url, client)

    def rss_kib(self) -> int:
        """VmRSS of the registry process(es) only; a private etcd is not counted."""
        pids = [self.pid, *(p for p in procs.descendants_of(self.pid) if procs.comm(p) != "etcd")]
        return sum(procs.status_kib(p, "VmRSS") or 0 for p in pids)


class PeerRegistry(Node):
    """CNCF Distribution 2.8.2 (Debian's `docker-registry`): in-memory blob descriptor cache as in
    Debian's shipped config, log level warn, no access log, no auth, upload purging off."""
    ready_path = "/v2/"
    kind = "distribution"

    def config_text(self) -> str:
        return distribution_config(self.data_dir / "data", self.port)

    def command(self) -> list[str]:
        config = self.data_dir / "distribution.yml"
        config.write_text(self.config_text())
        return self.pinned([PEER_BIN, "serve", str(config)])


class DistributionProxy(PeerRegistry):
    """The peer registry as a pull-through cache of `remote` (Distribution's `proxy: remoteurl:`
    mode): it serves pulls only, fetching what it lacks from `remote` and keeping it."""

    def __init__(self, data_dir: Path, remote: str, **kw):
        super().__init__(data_dir, **kw)
        self.remote = remote

    def config_text(self) -> str:
        return super().config_text() + f"proxy:\n  remoteurl: {self.remote}\n"


def start_all(nodes: list[Node]) -> None:
    """Start nodes concurrently; returns when every one is ready."""
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        for f in [pool.submit(n.start) for n in nodes]:
            f.result()


class Cluster:
    """One fresh etcd and the nodes of one cluster under `workdir`; a context manager."""

    def __init__(self, workdir: Path, name: str, settings: dict | None = None):
        self.workdir, self.name = Path(workdir), name
        self.settings = {"access_log": False, "log_level": "warning", **(settings or {})}
        self.etcd = Etcd(self.workdir / "etcd")
        self.nodes: dict[str, Node] = {}
        self.prefix = f"/cargohold/{name}/"

    def __enter__(self) -> "Cluster":
        self.etcd.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for node in reversed(list(self.nodes.values())):
            try:
                node.stop()
            except Exception as e:  # noqa: BLE001 - stop the others regardless
                print(f"  ! stopping {node.node_id}: {e}", file=sys.stderr)
        self.etcd.stop()

    def node(self, node_id: str, settings: dict | None = None) -> Node:
        """Define a node (not started)."""
        node = Node(self.workdir / node_id, settings={**self.settings, **(settings or {})},
                    etcd_url=self.etcd.url, cluster=self.name, node_id=node_id)
        self.nodes[node_id] = node
        return node

    def add(self, node_id: str, settings: dict | None = None) -> Node:
        """Define and start a node; returns when it is ready."""
        return self.node(node_id, settings).start()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return cli(self.etcd.url, self.name, *args, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 60):
        r = self.cli(*args, "--json", timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"cargohold {' '.join(args)} failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout)

    def holders(self) -> tuple[dict[str, set[str]], set[str]]:
        """(blob digest -> nodes publishing a copy, member ids), from etcd keys (one Range)."""
        holders: dict[str, set[str]] = {}
        members: set[str] = set()
        for key in self.etcd.keys(self.prefix):
            section, _, rest = key[len(self.prefix):].partition("/")
            if section == "blobs":
                digest, _, sub = rest.partition("/")
                rel, _, node = sub.partition("/")
                entry = holders.setdefault(digest, set())
                if rel == "at":
                    entry.add(node)
            elif section == "members":
                members.add(rest)
        return holders, members

    def samples(self) -> dict[str, metrics.Samples]:
        with httpx.Client(timeout=10.0) as c:
            return {nid: n.samples(c) for nid, n in self.nodes.items()}


class EtcdWatch:
    """An etcd watch on a prefix through the JSON gateway, in a thread: every event is
    timestamped on arrival (time.monotonic) as (t, "put"|"delete", key below the prefix,
    mod_revision). A stream adds no unary request to etcd's counts. Subclasses override `apply`."""

    def __init__(self, etcd_url: str, prefix: str):
        self.url, self.prefix = etcd_url, prefix
        self.events: list[tuple[float, str, str, int]] = []
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self._created = threading.Event()
        self._closing = False
        self._response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "EtcdWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "EtcdWatch":
        self._thread.start()
        if not self._created.wait(10) or self.error:
            raise TimeoutError(f"etcd watch not created: {self.error!r}")
        return self

    def stop(self) -> None:
        self._closing = True
        if self._response is not None:
            try:
                self._response.close()
            except Exception:  # noqa: BLE001 - closing a live stream may raise; we are done with it
                pass
        self._thread.join(5)

    def apply(self, t: float, kind: str, key: str, revision: int) -> None:
        """Called under `cond` for every event."""

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Block until `predicate()` (evaluated under the lock) holds; returns time.monotonic()."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                if self.error is not None:
                    raise RuntimeError(f"etcd watch failed: {self.error!r}")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
                self.cond.wait(min(deadline - time.monotonic(), 1.0))
            return time.monotonic()

    def _run(self) -> None:
        raw = self.prefix.encode()
        body = {"create_request": {"key": _b64(raw), "range_end": _b64(_prefix_end(raw))}}
        try:
            with httpx.stream("POST", self.url + "/v3/watch", json=body,
                              timeout=httpx.Timeout(10.0, read=None)) as r:
                self._response = r
                for line in r.iter_lines():
                    if line.strip():
                        self._received(time.monotonic(), json.loads(line).get("result", {}))
        except BaseException as e:  # noqa: BLE001 - closing the stream ends up here too
            if not self._closing:
                self.error = e
        finally:
            self._created.set()
            with self.cond:
                self.cond.notify_all()

    def _received(self, now: float, result: dict) -> None:
        if result.get("created"):
            self._created.set()
        with self.cond:
            for ev in result.get("events", []):
                key = base64.b64decode(ev["kv"]["key"]).decode()[len(self.prefix):]
                event = (now, ev.get("type", "PUT").lower(), key, int(ev["kv"].get("mod_revision", 0)))
                self.events.append(event)
                self.apply(*event)
            self.cond.notify_all()
