"""The GC scenario's cluster: one etcd and three nodes (bench.launch), GC progress read from etcd
through its JSON gateway (the coordinator's `Keys` give the key layout), CPU accounting by role,
and the monitor that follows a run phase by phase."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx

from bench import launch, metrics, procs
from bench.profiler import Profiler
from cargohold.coordinator.keys import Keys

CLUSTER = "gcbench"
NODES = ["n1", "n2", "n3"]


class GcView:
    """Read-only looks at the GC's records in etcd (cheap, no event loop needed)."""

    def __init__(self, etcd: launch.Etcd, cluster: str):
        self.etcd = etcd
        self.keys = Keys(cluster)

    def tombstones(self) -> int:
        return self.etcd.count(self.keys.tombstones_prefix())

    def leader(self) -> str | None:
        raw = self.etcd.get(self.keys.gc_leader())
        return raw.decode() if raw else None

    def run(self, run_id: str) -> dict | None:
        raw = self.etcd.get(self.keys.gc_run(run_id))
        return json.loads(raw) if raw else None

    def latest_run(self) -> dict | None:
        runs = [json.loads(v) for v in self.etcd.values(self.keys.prefix + "gc/runs/")]
        return max(runs, key=lambda r: r.get("requested", 0), default=None)

    def blob_keys(self) -> dict[str, list[str]]:
        """digest -> the kinds of its keys under blobs/ ("blob", "blob_at", "blob_in").

        Read in 16 bounded sub-ranges (blobs/sha256:0 .. f): one range end for the whole
        section costs O(rest of the range) per page in etcd 3.4 (scenario gc_etcd_range)."""
        found: dict[str, list[str]] = {}
        for h in "0123456789abcdef":
            sub = self.keys.section_prefix("blobs") + "sha256:" + h
            for key in self.etcd.paged_keys(sub):
                parsed = self.keys.parse(key)
                found.setdefault(parsed.digest, []).append(parsed.kind)
        return found


class GcCluster(launch.Cluster):
    def __init__(self, workdir: Path, *, gc_workers: int = 16, grace: str = "10m"):
        super().__init__(workdir, CLUSTER, {"gc_grace": grace, "gc_workers": gc_workers})
        for n in NODES:
            self.node(n)
        self.view = GcView(self.etcd, CLUSTER)

    @property
    def data_dirs(self) -> dict[str, Path]:
        return {n: node.data_dir for n, node in self.nodes.items()}

    def start(self) -> None:
        self.etcd.start()
        for node in self.nodes.values():
            node.start(timeout=60)

    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    def node_rss(self) -> dict:
        """VmRSS and VmHWM (peak) of each node, MiB."""
        return {n: {k: round((procs.status_kib(node.pid, k) or 0) / 1024, 1) for k in ("VmRSS", "VmHWM")}
                for n, node in self.nodes.items()}

    def etcd_info(self) -> dict:
        size = metrics.value(self.etcd.samples(), metrics.ETCD_DB_BYTES)
        return {"db_mib": round(size / 2**20, 1) if size else None,
                "rss_mib": round((procs.status_kib(self.etcd.pid, "VmRSS") or 0) / 1024, 1),
                "keys": self.etcd.count(self.view.keys.prefix)}

    def etcd_slow_applies(self) -> float:
        """etcd's count of requests that took over 100 ms to apply."""
        return metrics.value(self.etcd.samples(), metrics.ETCD_SLOW_APPLIES)

    def model_revisions(self) -> dict[str, int]:
        out = {}
        with httpx.Client(timeout=5.0) as client:
            for n, node in self.nodes.items():
                try:
                    out[n] = int(metrics.value(node.samples(client), metrics.READ_MODEL_REVISION))
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
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / procs.CLK_TCK, comm)
    return table


class CpuMeter:
    """CPU used by this benchmark's own processes (by role) and by everything else on the machine.

    A reading is the cumulative CPU time of this process and all its descendants, named by
    role (etcd, n1..n3, cli, py-spy, bench); the difference of two readings also gives the
    machine's busy time, and what is not ours is "others" (other work on the machine)."""

    def __init__(self, cluster: GcCluster):
        self.cluster = cluster
        self.me = os.getpid()
        self.seen: dict[int, tuple[str, float]] = {}   # every pid of ours ever read: its last reading

    def _role(self, pid: int, comm: str) -> str:
        if pid == self.me:
            return "bench"
        if pid == self.cluster.etcd.pid:
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
        busy, idle = procs.machine_cpu()
        total = busy + idle
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


# ------------------------------------------------------------------------------------------- GC monitor

class RunMonitor(threading.Thread):
    """Samples, once a second, the latest GC run (phase, swept, leader), the tombstone count,
    which nodes are alive and the CPU meter; cuts the timeline into phases afterwards. With a
    profiler, the leader is recorded separately in each phase."""

    def __init__(self, cluster: GcCluster, profiler: Profiler | None = None, label: str = "run",
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
        if self.profiler is not None and self.profiler.pyspy:
            name = f"{self.label}-leader-{leader}-{phase}" if leader else None
            if name != self._profiled:
                if self._profiled:
                    self.profiler.stop(self._profiled)
                if name and leader in self.cluster.nodes and phase not in ("idle", "queued"):
                    self.profiler.add(name, self.cluster.nodes[leader].pid)
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
