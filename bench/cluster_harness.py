"""Processes for the cluster benchmarks: one etcd and N cargohold nodes on loopback.

Everything started here is stopped by its pid (SIGTERM, then SIGKILL) when the
``Cluster`` is closed, also on Ctrl-C. Nothing here edits or reaches into cargohold's
state except through its public surfaces: HTTP (``/readyz``, ``/metrics``, the OCI API),
``python -m cargohold node list --json``, and etcd itself (its ``/metrics`` and its JSON
gateway ``/v3/kv/range``, read-only).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("CARGOHOLD_BENCH_PYTHON", sys.executable)
ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"

# The tree whose `cargohold` package the nodes import (bench/cluster.py --source/--commit).
SOURCE = {"dir": REPO_ROOT}
# When set (bench/cluster.py --trace DIR), nodes run under bench/cluster_trace.py and write
# their step timers to DIR/<cluster>-<node>.json.
TRACE = {"dir": None}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(SOURCE["dir"])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------- Prometheus text

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, frozenset(labels.items())): value} for every sample line."""
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        out[(name, frozenset(_LABEL.findall(labels or "")))] = v
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# --------------------------------------------------------------------------- processes

def _stop_popen(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"  ! pid {proc.pid} ignored SIGTERM for {grace:.0f}s; SIGKILL", file=sys.stderr)
            proc.kill()
            proc.wait(10)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class Etcd:
    workdir: Path
    client_port: int = 0
    peer_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "etcd.log"

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_port, self.peer_port = free_port(), free_port()
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [ETCD_BIN, "--name", "default", "--data-dir", str(self.workdir / "data"),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"default={peer}", "--max-txn-ops", "4096",
               "--log-level", "warn"]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"etcd exited {self.proc.returncode}:\n{_tail(self.log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    r = c.get(self.url + "/health")
                    if r.status_code == 200 and r.json().get("health") in ("true", True):
                        return
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd not healthy after {timeout:.0f}s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_popen(self.proc, 10.0)
            self.proc = None

    # -- observation (HTTP only: /metrics is not a gRPC request and counts nothing)
    def samples(self) -> dict:
        return parse_prometheus(httpx.get(self.url + "/metrics", timeout=10.0).text)

    def revision(self, samples: dict | None = None) -> int:
        s = samples if samples is not None else self.samples()
        return int(metric(s, "etcd_debugging_mvcc_current_revision"))

    @staticmethod
    def rpc_counts(samples: dict) -> dict[str, int]:
        """Completed gRPC calls handled by etcd, by method (unary KV/Lease calls; all codes)."""
        out: dict[str, int] = {}
        for (name, labels), v in samples.items():
            if name != "grpc_server_handled_total" or not v:
                continue
            d = dict(labels)
            if d.get("grpc_type") != "unary":
                continue
            out[d["grpc_method"]] = out.get(d["grpc_method"], 0) + int(v)
        return out

    def range_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (JSON gateway, keys only, one Range request)."""
        p = prefix.encode()
        end = p[:-1] + bytes([p[-1] + 1])
        body = {"key": base64.b64encode(p).decode(), "range_end": base64.b64encode(end).decode(),
                "keys_only": True}
        r = httpx.post(self.url + "/v3/kv/range", json=body, timeout=10.0)
        r.raise_for_status()
        return [base64.b64decode(kv["key"]).decode() for kv in r.json().get("kvs", [])]


@dataclass
class Node:
    node_id: str
    workdir: Path
    etcd_url: str
    cluster: str
    settings: dict = field(default_factory=dict)
    port: int = 0
    grpc_port: int = 0
    proc: subprocess.Popen | None = None
    spawned_at: float = 0.0
    ready_at: float = 0.0
    trace_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    def spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.grpc_port = free_port(), free_port()
        config = self.workdir / "config.yaml"
        config.write_text(json.dumps(self.settings))      # JSON is YAML
        launch = ["-m", "cargohold"]
        if TRACE["dir"] is not None:
            self.trace_path = Path(TRACE["dir"]) / f"{self.cluster}-{self.node_id}.json"
            launch = [str(Path(__file__).resolve().parent / "cluster_trace.py"), str(self.trace_path)]
        cmd = [PYTHON, *launch, "serve", "--config", str(config),
               "--etcd", self.etcd_url, "--cluster", self.cluster, "--node-id", self.node_id,
               "--listen", f"127.0.0.1:{self.port}", "--grpc-listen", f"127.0.0.1:{self.grpc_port}",
               "--data-dir", str(self.workdir / "data"), "--log-level", "warning"]
        log = open(self.log_path, "ab")
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=str(SOURCE["dir"]), env=node_env(), start_new_session=True)
        log.close()

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.05) -> float:
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(timeout=3.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node {self.node_id} exited {self.proc.returncode} before ready:\n"
                                       f"{_tail(self.log_path)}")
                try:
                    r = c.get(self.url + "/readyz")
                    if r.status_code == 200:
                        self.ready_at = time.monotonic()
                        return self.ready_at
                    last = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    last = type(e).__name__
                time.sleep(interval)
        raise TimeoutError(f"node {self.node_id} not ready after {timeout:.0f}s ({last}):\n"
                           f"{_tail(self.log_path)}")

    def start(self, timeout: float = 60.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_popen(self.proc, 20.0)
            self.proc = None

    def samples(self, client: httpx.Client | None = None) -> dict:
        get = client.get if client is not None else httpx.get
        return parse_prometheus(get(self.url + "/metrics", timeout=10.0).text)

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)


class Cluster:
    """One fresh etcd and the nodes of one cluster, all under ``workdir``; a context manager."""

    def __init__(self, workdir: Path, name: str, settings: dict | None = None):
        self.workdir = workdir
        self.name = name
        self.settings = {"access_log": False, "replicas_per_site": 2, **(settings or {})}
        self.etcd = Etcd(workdir / "etcd")
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

    def add(self, node_id: str, *, wait: bool = True) -> Node:
        node = Node(node_id, self.workdir / node_id, self.etcd.url, self.name, dict(self.settings))
        self.nodes[node_id] = node
        node.spawn()
        if wait:
            node.wait_ready()
        return node

    def urls(self) -> list[str]:
        return [n.url for n in self.nodes.values()]

    # -- state, read from etcd (one Range request) or the operator command
    def holders(self) -> tuple[dict[str, set[str]], set[str]]:
        """(blob digest -> nodes publishing a copy, active member ids), straight from etcd keys."""
        holders: dict[str, set[str]] = {}
        members: set[str] = set()
        for key in self.etcd.range_keys(self.prefix):
            rest = key[len(self.prefix):]
            section, _, rest = rest.partition("/")
            if section == "blobs":
                digest, _, sub = rest.partition("/")
                entry = holders.setdefault(digest, set())
                rel, _, target = sub.partition("/")
                if rel == "at":
                    entry.add(target)
            elif section == "members":
                members.add(rest)
        return holders, members

    def node_list(self) -> list[dict]:
        """`cargohold node list --json` (the operator's view)."""
        r = subprocess.run([PYTHON, "-m", "cargohold", "node", "list", "--json", "--etcd", self.etcd.url,
                            "--cluster", self.name], cwd=str(SOURCE["dir"]), env=node_env(),
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"node list failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout)

    def samples(self) -> dict[str, dict]:
        with httpx.Client(timeout=10.0) as c:
            return {nid: n.samples(c) for nid, n in self.nodes.items()}

    def wait_quiet(self, timeout: float, *, copies: int | None = None, held: dict[str, int] | None = None,
                   stable: float = 0.5, interval: float = 0.05) -> float:
        """Wait until replication is idle: every node's read model is at etcd's revision, no
        node has queued work, (optionally) the nodes hold ``copies`` blob copies in all and
        each node exactly ``held[node]`` blobs, and this stays so for ``stable`` seconds.
        Uses only /metrics (no etcd requests are made). Returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        quiet_since = None
        last = ""
        with httpx.Client(timeout=10.0) as c:
            while time.monotonic() < deadline:
                rev = self.etcd.revision()
                ok = True
                total = 0
                for nid, n in self.nodes.items():
                    s = n.samples(c)
                    model = int(metric(s, "cargohold_read_model_revision"))
                    queue = metric(s, "cargohold_replication_queue_depth")
                    mine = int(metric(s, "cargohold_blobs_held"))
                    total += mine
                    if model != rev or queue:
                        ok = False
                        last = f"{nid}: model rev {model} vs etcd {rev}, queue {queue}"
                    if held is not None and held.get(nid, 0) != mine:
                        ok = False
                        last = f"{nid} holds {mine} blobs, want {held.get(nid, 0)}"
                if copies is not None and total != copies:
                    ok = False
                    last = f"{total} copies held, want {copies}"
                if ok:
                    if quiet_since is None:
                        quiet_since = time.monotonic()
                    elif time.monotonic() - quiet_since >= stable:
                        return time.monotonic() - t0
                else:
                    quiet_since = None
                time.sleep(interval)
        raise TimeoutError(f"cluster not quiet after {timeout:.0f}s ({last})")


class WatchRecorder:
    """Follows an etcd watch on a prefix through the JSON gateway (a gRPC stream: it adds no
    unary requests) and timestamps every event on arrival: (monotonic time, PUT|DELETE, key)."""

    def __init__(self, etcd: Etcd, prefix: str):
        import threading
        self.etcd, self.prefix = etcd, prefix
        self.events: list[tuple[float, str, str]] = []
        self.error: BaseException | None = None
        self._created = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._response: httpx.Response | None = None

    def __enter__(self) -> "WatchRecorder":
        self._thread.start()
        if not self._created.wait(10):
            raise TimeoutError(f"etcd watch not created: {self.error}")
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        if self._response is not None:
            with contextlib.suppress(Exception):
                self._response.close()
        self._thread.join(5)

    def _run(self) -> None:
        p = self.prefix.encode()
        end = p[:-1] + bytes([p[-1] + 1])
        body = {"create_request": {"key": base64.b64encode(p).decode(),
                                   "range_end": base64.b64encode(end).decode()}}
        try:
            with httpx.stream("POST", self.etcd.url + "/v3/watch", json=body,
                              timeout=httpx.Timeout(10.0, read=None)) as r:
                self._response = r
                for line in r.iter_lines():
                    now = time.monotonic()
                    if not line.strip():
                        continue
                    doc = json.loads(line)
                    result = doc.get("result", {})
                    if result.get("created"):
                        self._created.set()
                    for ev in result.get("events", []):
                        key = base64.b64decode(ev["kv"]["key"]).decode()
                        self.events.append((now, ev.get("type", "PUT"), key[len(self.prefix):]))
        except BaseException as e:  # noqa: BLE001 - closing the stream ends up here too
            if not self._stop:
                self.error = e
        finally:
            self._created.set()
