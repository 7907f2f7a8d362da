"""Processes and instruments for bench/gc.py: one etcd and three nodes on loopback, read-only
looks at etcd, CPU accounting, a GC-run monitor, and py-spy.

Every process is started here and stopped by its pid (`Cluster.close`, `Profiler.stop`).
Nothing here writes cargohold state except through the CLI (`gc run`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cargohold.coordinator.keys import Keys  # noqa: E402
from tests.support.etcd import EtcdProcess  # noqa: E402
from tests.support.node import NodeProcess, free_port  # noqa: E402

PYTHON = sys.executable
CLUSTER = "gcbench"
NODES = ["n1", "n2", "n3"]
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The tree whose `cargohold` the nodes and the CLI run (bench/gc.py --commit REF: an export of
# that commit, so that uncommitted edits made in the working tree meanwhile cannot change a run).
SOURCE = {"dir": REPO_ROOT}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def source_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SOURCE["dir"])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def export_commit(ref: str, dest: Path) -> str:
    """`git archive REF` unpacked into dest; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def rss(pid: int | None) -> dict:
    """VmRSS and VmHWM (peak) of a process, MiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    except (OSError, TypeError):
        pass
    return out


# ------------------------------------------------------------------------------------------- etcd reads

class EtcdView:
    """Read-only looks at etcd through its JSON gateway (cheap, no event loop needed)."""

    def __init__(self, url: str, cluster: str):
        self.url = url
        self.keys = Keys(cluster)
        self.http = httpx.Client(timeout=30.0)

    @staticmethod
    def _b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    @staticmethod
    def _end(raw: bytes) -> bytes:
        return raw[:-1] + bytes([raw[-1] + 1])

    def _range(self, key: str, prefix: bool = False, **extra) -> dict:
        raw = key.encode()
        body = {"key": self._b64(raw), **extra}
        if prefix:
            body["range_end"] = self._b64(self._end(raw))
        r = self.http.post(self.url + "/v3/kv/range", json=body)
        r.raise_for_status()
        return r.json()

    def count(self, prefix: str) -> int:
        return int(self._range(prefix, prefix=True, count_only=True).get("count", 0))

    def get(self, key: str) -> bytes | None:
        kvs = self._range(key).get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def tombstones(self) -> int:
        return self.count(self.keys.tombstones_prefix())

    def leader(self) -> str | None:
        raw = self.get(self.keys.gc_leader())
        return raw.decode() if raw else None

    def run(self, run_id: str) -> dict | None:
        raw = self.get(self.keys.gc_run(run_id))
        return json.loads(raw) if raw else None

    def latest_run(self) -> dict | None:
        kvs = self._range(self.keys.prefix + "gc/runs/", prefix=True).get("kvs") or []
        runs = [json.loads(base64.b64decode(kv["value"])) for kv in kvs]
        return max(runs, key=lambda r: r.get("requested", 0), default=None)

    def blob_keys(self) -> dict[str, list[str]]:
        """digest -> the kinds of its keys under blobs/ ("blob", "blob_at", "blob_in").

        Read in 16 bounded sub-ranges (blobs/sha256:0 .. f): one range end for the whole
        section costs O(rest of the range) per page in etcd 3.4 (bench/gc_etcd_range.py)."""
        found: dict[str, list[str]] = {}
        for h in "0123456789abcdef":
            sub = (self.keys.section_prefix("blobs") + "sha256:" + h).encode()
            start, end = sub, self._end(sub)
            while True:
                r = self.http.post(self.url + "/v3/kv/range", json={
                    "key": self._b64(start), "range_end": self._b64(end), "keys_only": True, "limit": 5000})
                r.raise_for_status()
                doc = r.json()
                kvs = doc.get("kvs") or []
                for kv in kvs:
                    parsed = self.keys.parse(base64.b64decode(kv["key"]).decode())
                    found.setdefault(parsed.digest, []).append(parsed.kind)
                if not doc.get("more") or not kvs:
                    break
                start = base64.b64decode(kvs[-1]["key"]) + b"\0"
        return found

    def metrics(self, names: tuple[str, ...]) -> dict:
        text = self.http.get(self.url + "/metrics").text
        out = {}
        for name in names:
            m = re.search(rf"^{re.escape(name)}\s+(\S+)", text, re.M)
            out[name] = float(m.group(1)) if m else None
        return out

    def close(self) -> None:
        self.http.close()


# ------------------------------------------------------------------------------------------- processes

class Node(NodeProcess):
    """tests/support/node.py's NodeProcess, run from SOURCE["dir"] (NodeProcess always runs the
    tree it lives in). `on_spawn(pid)` is called right after the process is created."""

    on_spawn = None

    def start(self, timeout: float = 60.0) -> "Node":
        if self.alive():
            raise RuntimeError("node already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n=== start: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(self.command(), cwd=str(SOURCE["dir"]), env=source_env(),
                                     stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if self.on_spawn is not None:
            self.on_spawn(self.proc.pid)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self


class Cluster:
    def __init__(self, workdir: Path, *, gc_workers: int = 16, grace: str = "10m"):
        self.workdir = workdir
        self.etcd = EtcdProcess(workdir / "etcd")
        self.config = workdir / "node.yaml"
        self.config.write_text(f"gc_grace: {grace}\naccess_log: false\nlog_level: warning\n"
                               f"gc_workers: {gc_workers}\n")
        self.nodes = {n: Node(workdir / n, cluster=CLUSTER, node_id=n, extra_args=["--config", str(self.config)])
                      for n in NODES}
        self.view: EtcdView | None = None

    @property
    def data_dirs(self) -> dict[str, Path]:
        return {n: node.data_dir for n, node in self.nodes.items()}

    @property
    def etcd_pid(self) -> int | None:
        proc = getattr(self.etcd, "_proc", None)
        return proc.pid if proc is not None else None

    def start(self) -> None:
        self.etcd.start()
        self.view = EtcdView(self.etcd.url, CLUSTER)
        for node in self.nodes.values():
            node.etcd_url = self.etcd.url
            node.start(timeout=60)

    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    def node_rss(self) -> dict:
        return {n: rss(node.pid) for n, node in self.nodes.items()}

    def etcd_info(self) -> dict:
        m = self.view.metrics(("etcd_mvcc_db_total_size_in_bytes",))
        size = m["etcd_mvcc_db_total_size_in_bytes"]
        return {"db_mib": round(size / 2**20, 1) if size else None, "rss": rss(self.etcd_pid),
                "keys": self.view.count(self.view.keys.prefix)}

    def etcd_slow(self) -> dict:
        """etcd's counters of requests that took over 100 ms to apply, and of leader changes."""
        return self.view.metrics(("etcd_server_slow_apply_total", "etcd_server_leader_changes_seen_total"))

    def model_revisions(self) -> dict[str, int]:
        out = {}
        with httpx.Client(timeout=5.0) as client:
            for n, node in self.nodes.items():
                try:
                    text = client.get(node.url + "/metrics").text
                    m = re.search(r"^cargohold_read_model_revision\s+(\S+)", text, re.M)
                    out[n] = int(float(m.group(1))) if m else 0
                except httpx.HTTPError:
                    out[n] = 0
        return out

    def wait_absorbed(self, revision: int, timeout: float) -> dict:
        """Seconds (from now) until each node's read model has applied `revision`."""
        started = time.monotonic()
        done: dict[str, float] = {}
        while len(done) < len(self.nodes) and time.monotonic() - started < timeout:
            for n, rev in self.model_revisions().items():
                if n not in done and rev >= revision:
                    done[n] = round(time.monotonic() - started, 2)
            time.sleep(0.2)
        return {n: done.get(n) for n in self.nodes}

    def cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "cargohold", *args, "--etcd", self.etcd.url, "--cluster", CLUSTER],
                              cwd=SOURCE["dir"], capture_output=True, text=True, timeout=timeout, env=source_env())

    def close(self) -> None:
        for node in self.nodes.values():
            try:
                node.stop(timeout=20)
            except Exception as exc:  # noqa: BLE001 - stop the rest anyway
                log(f"stopping {node.node_id}: {exc}")
        if self.view is not None:
            self.view.close()
        self.etcd.stop()


# ------------------------------------------------------------------------------------------- CPU

def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, cpu seconds, comm) for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK, comm)
    return table


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])
    idle = values[3] + values[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


class CpuMeter:
    """CPU used by this benchmark's own processes (by role) and by everything else on the machine.

    A reading is the cumulative CPU time of this process and all its descendants, named by
    role (etcd, n1..n3, cli, py-spy, bench); the difference of two readings also gives the
    machine's busy time, and what is not ours is "others" (other work on the machine)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.me = os.getpid()
        self.seen: dict[int, tuple[str, float]] = {}   # every pid of ours ever read: its last reading

    def _role(self, pid: int, comm: str) -> str:
        if pid == self.me:
            return "bench"
        if pid == self.cluster.etcd_pid:
            return "etcd"
        for n, node in self.cluster.nodes.items():
            if node.pid == pid:
                return n
        if comm.startswith("py-spy"):
            return "py-spy"
        return "cli" if comm.startswith("python") else comm

    def read(self) -> dict:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        ours, stack = {}, [self.me]
        while stack:
            pid = stack.pop()
            if pid in table:
                ours[pid] = (self._role(pid, table[pid][2]), table[pid][1])
                stack.extend(children.get(pid, ()))
        busy, total = _machine_cpu()
        # A process that exited since (a CLI run) keeps its last reading: its CPU up to then counts.
        self.seen.update(ours)
        return {"t": time.monotonic(), "busy": busy, "total": total, "procs": dict(self.seen)}

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        """CPU seconds per role between two readings, and the machine's busy and idle share."""
        out: dict[str, float] = {}
        for pid, (role, cpu) in b["procs"].items():
            before = a["procs"].get(pid)
            used = cpu - before[1] if before and before[0] == role else cpu
            out[role] = out.get(role, 0.0) + max(used, 0.0)
        wall = max(b["t"] - a["t"], 1e-6)
        busy = b["busy"] - a["busy"]
        ncpu = os.cpu_count() or 1
        result = {role: round(v, 2) for role, v in sorted(out.items())}
        result["others"] = round(max(busy - sum(out.values()), 0.0), 2)
        result["wall_s"] = round(wall, 2)
        result["machine_busy_pct"] = round(100 * busy / (wall * ncpu), 1)
        return result


# ------------------------------------------------------------------------------------------- py-spy

class Profiler:
    """py-spy record (raw collapsed stacks, GIL-holding samples only: where CPU goes) of some
    pids until stopped; then the top frames of each."""

    def __init__(self, outdir: Path | None, rate: int = 50):
        self.outdir = outdir
        self.rate = rate
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.results: dict[str, dict] = {}

    @property
    def enabled(self) -> bool:
        return self.outdir is not None

    def start(self, name: str, pid: int | None) -> None:
        if self.outdir is None or pid is None:
            return
        self.outdir.mkdir(parents=True, exist_ok=True)
        out = self.outdir / f"{name}.txt"
        proc = subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                                 "--gil", "--nonblocking", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[name] = (proc, out)

    def stop(self, name: str | None = None) -> dict:
        names = [name] if name is not None else list(self.procs)
        for n in names:
            if n not in self.procs:
                continue
            proc, out = self.procs.pop(n)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.results[n] = top_frames(out)
        return {n: self.results[n] for n in names if n in self.results}


def top_frames(path: Path, n: int = 25) -> dict:
    """Self and inclusive sample shares of the hottest frames in a py-spy raw (collapsed) file."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [re.sub(r" \(/.*?/(site-packages|python3\.\d+|src|main)/", " (", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    pct = lambda d: [(f, round(100 * v / total, 1)) for f, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]  # noqa: E731
    return {"samples": total, "file": str(path), "self_pct": pct(own), "inclusive_pct": pct(incl)}


# ------------------------------------------------------------------------------------------- GC monitor

class RunMonitor(threading.Thread):
    """Samples, once a second, the latest GC run (phase, swept, leader), the tombstone count,
    which nodes are alive and the CPU meter; cuts the timeline into phases afterwards. With a
    profiler, the leader is recorded separately in each phase."""

    def __init__(self, cluster: Cluster, profiler: Profiler | None = None, label: str = "run",
                 interval: float = 1.0):
        super().__init__(daemon=True, name="gc-monitor")
        self.cluster = cluster
        self.profiler = profiler
        self.label = label
        self.interval = interval
        self.meter = CpuMeter(cluster)
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self._profiled: str | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        try:
            run = self.cluster.view.latest_run() or {}
            tombstones = self.cluster.view.tombstones()
        except httpx.HTTPError:
            run, tombstones = {}, None
        state = run.get("state")
        phase = run.get("phase") or "?" if state == "running" else ("queued" if state == "requested" else "idle")
        leader = run.get("leader") or self.cluster.view.leader()
        self.samples.append({"t": time.monotonic(), "run": run.get("id"), "phase": phase, "swept": run.get("swept"),
                             "tombstones": tombstones, "leader": leader,
                             "alive": "".join("1" if n.alive() else "0" for n in self.cluster.nodes.values()),
                             "cpu": self.meter.read()})
        if self.profiler is not None and self.profiler.enabled:
            name = f"{self.label}-leader-{leader}-{phase}" if leader else None
            if name != self._profiled:
                if self._profiled:
                    self.profiler.stop(self._profiled)
                if name and leader in self.cluster.nodes and phase not in ("idle", "queued"):
                    self.profiler.start(name, self.cluster.nodes[leader].pid)
                    self._profiled = name
                else:
                    self._profiled = None

    def finish(self) -> None:
        self.stop_event.set()
        self.join(10)
        self.sample()
        if self.profiler is not None and self._profiled:
            self.profiler.stop(self._profiled)
            self._profiled = None

    def segments(self) -> list[dict]:
        """Consecutive samples of one (run, phase): start/end (monotonic), duration, CPU by role."""
        out: list[dict] = []
        for s in self.samples:
            key = (s["run"], s["phase"])
            if out and out[-1]["key"] == key:
                out[-1]["last"] = s
            else:
                if out:
                    out[-1]["next"] = s
                out.append({"key": key, "first": s, "last": s})
        result = []
        for seg in out:
            end = seg.get("next", seg["last"])
            result.append({"run": seg["key"][0], "phase": seg["key"][1], "start": seg["first"]["t"],
                           "end": end["t"], "seconds": round(end["t"] - seg["first"]["t"], 1),
                           "swept": (seg["first"]["swept"], end["swept"]),
                           "tombstones": (seg["first"]["tombstones"], end["tombstones"]),
                           "cpu": CpuMeter.delta(seg["first"]["cpu"], end["cpu"])})
        return result

    def timeline(self, every: float = 10.0) -> list[tuple]:
        """A compact timeline: (seconds since the first sample, phase, swept, tombstones, leader, alive)."""
        if not self.samples:
            return []
        t0, last, out = self.samples[0]["t"], None, []
        for s in self.samples:
            if last is None or s["phase"] != last["phase"] or s["t"] - last["t"] >= every or s is self.samples[-1]:
                out.append((round(s["t"] - t0, 1), s["phase"], s["swept"], s["tombstones"], s["leader"], s["alive"]))
                last = s
        return out
