"""Garbage collection benchmark (issue 5, "Performance"); bench/GC.md says what and why.

    /work/venv/bin/python bench/gc.py [--quick] [--json FILE] [--commit REF] [--profile DIR]

1. **scale** (target: a run under 2 minutes). One etcd and three nodes on loopback. A state
   of 100,000 blobs (60,000 referenced by 20,000 tagged manifests, 40,000 unreferenced and
   older than the grace period; 2 copies each) is written straight into etcd
   (bench/gc_seed.py) while the nodes run, and the files onto their owners' disks. Measured:
   seeding and the nodes' watch catch-up, a rolling restart (start-up time with that state,
   memory), then `cargohold gc run --wait --json` (wall time, the run's `duration`, marked,
   candidates, swept, the time of each phase and the CPU each process used in it) and the
   time until every tombstone is gone; then a check that every dead blob's keys and files
   are gone and every live one is intact. A second run on a fresh dead set of the same size
   is requested without `--wait` and followed by reading its record, which separates the
   cost of the CLI's own follower from the run's.
2. **push** (target: p99 with GC at most 1.5x without). In the same cluster, with a fresh
   dead set: three clients (one per node) push small images continuously; windows without
   GC (before), with GC runs requested back to back, and without GC again (after). p50/p99 of
   the manifest PUT, the blob POST and the whole image per window, and per GC phase.

Everything listens on 127.0.0.1, every wait is bounded (--timeout), every process started
here is stopped by its pid at the end, also on an error or Ctrl-C. Exit status: 0 all targets
met, 1 a target missed, 2 an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
for _p in (str(REPO_ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gc_cluster  # noqa: E402
import gc_push  # noqa: E402
import gc_seed  # noqa: E402
from gc_cluster import NODES, Cluster, Profiler, RunMonitor, log  # noqa: E402

FULL = {"manifests": 20000, "dead": 40000, "push_seconds": 30.0, "push_dead": 20000, "push_max_seconds": 900.0}
QUICK = {"manifests": 2000, "dead": 4000, "push_seconds": 8.0, "push_dead": 3000, "push_max_seconds": 120.0}

GC_TARGET_S = 120.0
P99_RATIO_TARGET = 1.5
FINISHED = ("done", "failed")


# ------------------------------------------------------------------------------------------- steps

def seed_state(cluster: Cluster, data: gc_seed.Dataset, out: dict) -> None:
    out["dataset"] = data.counts()
    log(f"writing {data.counts()} as files on the owners' disks")
    out["files"] = gc_seed.write_files(data, cluster.data_dirs)
    log("seeding etcd (the nodes run: their watches absorb it)")
    out["seed"] = gc_seed.seed(cluster.etcd.url, gc_cluster.CLUSTER, data)
    out["absorb_s"] = cluster.wait_absorbed(out["seed"]["revision"], timeout=600)
    log(f"seeded: {out['seed']}; every node's read model caught up after {out['absorb_s']} s")


def wait_tombstones_gone(cluster: Cluster, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.view.tombstones() == 0:
            return True
        time.sleep(0.5)
    return cluster.view.tombstones() == 0


def measured_run(cluster: Cluster, profiler: Profiler, label: str, *, wait_cli: bool, deadline: float) -> dict:
    """One GC run, requested with `gc run --wait --json` (wait_cli) or `gc run --json` and then
    followed by reading its record; monitored until every tombstone is gone."""
    out: dict = {"how": "gc run --wait --json" if wait_cli else "gc run --json, then the run record polled"}
    leader = cluster.view.leader()
    out["leader_before"] = leader
    slow_before = cluster.etcd_slow()
    monitor = RunMonitor(cluster, profiler, label=label)
    for n, node in cluster.nodes.items():
        if n != leader:
            profiler.start(f"{label}-{n}", node.pid)
    monitor.start()
    t0 = time.monotonic()
    budget = max(deadline - time.monotonic(), 60)
    if wait_cli:
        log(f"{label}: gc run --wait --json (leader {leader})")
        proc = cluster.cli("gc", "run", "--wait", "--json", timeout=budget)
        try:
            run = json.loads(proc.stdout)
        except ValueError:
            run = {"state": f"CLI exit {proc.returncode}, no JSON", "error": proc.stderr[-1500:]}
    else:
        log(f"{label}: gc run --json, then polling the run record (leader {leader})")
        proc = cluster.cli("gc", "run", "--json", timeout=60)
        run_id = json.loads(proc.stdout)["run"]
        run = {}
        while time.monotonic() - t0 < budget:
            run = cluster.view.run(run_id) or {}
            if run.get("state") in FINISHED:
                break
            time.sleep(0.25)
    wall = time.monotonic() - t0
    out["wall_s"] = round(wall, 2)
    out["run"] = {k: run.get(k) for k in ("id", "state", "duration", "marked", "candidates", "candidate_bytes",
                                          "swept", "bytes_freed", "manifests_deleted", "leaders", "error")}
    log(f"{label}: {out['run']} after {wall:.1f} s")
    if run.get("state") == "done":
        gone = wait_tombstones_gone(cluster, timeout=max(min(deadline - time.monotonic(), 900), 30))
        out["tombstones_gone_s"] = round(time.monotonic() - t0, 2) if gone else None
    out["tombstones_left"] = cluster.view.tombstones()
    monitor.finish()
    profiler.stop()
    out["nodes_alive"] = {n: node.alive() for n, node in cluster.nodes.items()}
    slow_after = cluster.etcd_slow()
    out["etcd_slow_applies"] = (slow_after["etcd_server_slow_apply_total"] or 0) - \
        (slow_before["etcd_server_slow_apply_total"] or 0)
    out["phases"] = [{k: v for k, v in seg.items() if k not in ("start", "end")} for seg in monitor.segments()]
    out["timeline"] = monitor.timeline()
    out["rss_after_mib"] = cluster.node_rss()
    return out


def verify(cluster: Cluster, live: list[gc_seed.Blob], dead: list[gc_seed.Blob]) -> dict:
    """Dead blobs: no key left in etcd, no file on any disk. Live ones: record, copies, files."""
    found = cluster.view.blob_keys()
    check = {
        "dead_with_keys": sum(1 for b in dead if b.digest in found),
        "dead_files_left": gc_seed.files_present(cluster.data_dirs, dead),
        "live_missing_record": sum(1 for b in live if "blob" not in found.get(b.digest, ())),
        "live_missing_copies": sum(1 for b in live if found.get(b.digest, []).count("blob_at") < len(b.owners)),
        "live_files_missing": sum(len(b.owners) for b in live) - gc_seed.files_present(cluster.data_dirs, live),
    }
    check["ok"] = not any(check.values())
    log(f"check: {check}")
    return check


def live_blobs(data: gc_seed.Dataset) -> list[gc_seed.Blob]:
    return data.live + [gc_seed.Blob(m.digest, m.body, m.repo, m.owners) for m in data.manifests]


# ------------------------------------------------------------------------------------------- phases

def scale_phase(cluster: Cluster, params: dict, profiler: Profiler, deadline: float, out: dict) -> None:
    """Fills `out` as it goes, so that a failure still reports what was measured before it."""
    log(f"scale: {params['manifests']} manifests, {3 * params['manifests']} live and {params['dead']} dead blobs")
    data = gc_seed.generate(label="scale", manifests=params["manifests"], dead=params["dead"], nodes=NODES)
    out["state"] = {}
    seed_state(cluster, data, out["state"])
    out["state"]["rss_after_absorb_mib"] = cluster.node_rss()
    out["state"]["etcd"] = cluster.etcd_info()

    if params["restart"]:
        log("rolling restart, one node at a time: start-up time with the seeded state")
        out["startup_s"] = {}
        for n, node in cluster.nodes.items():
            node.stop(timeout=20)
            if profiler.enabled and n == NODES[0]:
                node.on_spawn = lambda pid, n=n: profiler.start(f"startup-{n}", pid)
            t0 = time.monotonic()
            node.start(timeout=max(min(deadline - time.monotonic(), 900), 30))
            out["startup_s"][n] = round(time.monotonic() - t0, 2)
            node.on_spawn = None
            profiler.stop(f"startup-{n}")
            log(f"{n} ready after {out['startup_s'][n]} s")
        out["rss_after_restart_mib"] = cluster.node_rss()
        log(f"node memory: {out['rss_after_restart_mib']}")
    time.sleep(3.0)

    out["run_wait"] = measured_run(cluster, profiler, "scale", wait_cli=True, deadline=deadline)
    out["check"] = verify(cluster, live_blobs(data), data.dead)
    if out["run_wait"]["run"]["state"] != "done" or not all(out["run_wait"]["nodes_alive"].values()):
        raise RuntimeError(f"gc run did not complete: {out['run_wait']['run']}; nodes alive "
                           f"{out['run_wait']['nodes_alive']}")

    if params["second_run"]:
        log(f"scale, second run: a fresh dead set of {params['dead']} blobs")
        out["state2"] = {}
        dead2 = seed_dead_set(cluster, "scale2", params["dead"], "gcbench/dead2", out["state2"])
        out["run_polled"] = measured_run(cluster, profiler, "scale2", wait_cli=False, deadline=deadline)
        out["check2"] = verify(cluster, live_blobs(data), dead2.dead)


def seed_dead_set(cluster: Cluster, label: str, count: int, repo_prefix: str, out: dict):
    """Seed `count` new unreferenced blobs (no manifests), then let the nodes' watches settle."""
    dead = gc_seed.generate(label=label, manifests=0, dead=count, nodes=NODES, repo_prefix=repo_prefix)
    seed_state(cluster, dead, out)
    time.sleep(3.0)
    return dead


def gc_loop(cluster: Cluster, stop: threading.Event, runs: list[dict], errors: list[str]) -> None:
    """Request GC runs back to back (`gc run --json`, then poll the run record) until `stop`;
    the run in progress when `stop` is set is followed to its end."""
    while not stop.is_set():
        t0 = time.monotonic()
        proc = cluster.cli("gc", "run", "--json", timeout=60)
        if proc.returncode != 0:
            errors.append(proc.stderr[-500:])
            return
        run_id = json.loads(proc.stdout)["run"]
        while True:
            record = cluster.view.run(run_id) or {}
            if record.get("state") in FINISHED:
                break
            if time.monotonic() - t0 > 1200:
                errors.append(f"run {run_id} did not finish in 1200 s")
                return
            time.sleep(0.25)
        runs.append({"id": run_id, "wall_s": round(time.monotonic() - t0, 2),
                     **{k: record.get(k) for k in ("state", "duration", "marked", "candidates", "swept")}})


def push_phase(cluster: Cluster, params: dict, profiler: Profiler, deadline: float, out: dict) -> None:
    seconds = params["push_seconds"]
    log(f"push: a fresh dead set of {params['push_dead']} blobs")
    out["state"] = {}
    dead = seed_dead_set(cluster, "push", params["push_dead"], "gcbench/dead3", out["state"])
    leader = cluster.view.leader()
    out["leader"] = leader
    out["clients"] = {n: f"{node.url} ({'GC leader' if n == leader else 'follower'})"
                      for n, node in cluster.nodes.items()}
    session = gc_push.PushSession(cluster.urls(), "gcbench/push", rate=params["push_rate"]).start()
    out["push_rate"] = params["push_rate"] or "back to back"
    monitor = RunMonitor(cluster, profiler, label="push")
    meter = gc_cluster.CpuMeter(cluster)
    windows: dict[str, tuple[float, float]] = {}
    cpu: dict[str, dict] = {}
    try:
        time.sleep(2.0)                                     # warm-up, not counted
        log(f"push: {seconds:.0f} s without GC")
        t, c = time.monotonic(), meter.read()
        time.sleep(seconds)
        windows["before"] = (t, time.monotonic())
        cpu["before"] = meter.delta(c, meter.read())

        log("push: GC runs back to back")
        for n, node in cluster.nodes.items():
            if n != leader:
                profiler.start(f"push-{n}", node.pid)
        stop, runs, errors = threading.Event(), [], []
        c = meter.read()
        monitor.start()
        loop = threading.Thread(target=gc_loop, args=(cluster, stop, runs, errors), daemon=True)
        t = time.monotonic()
        loop.start()
        limit = min(params["push_max_seconds"], max(deadline - time.monotonic() - 120, 30))
        while time.monotonic() - t < limit and loop.is_alive():
            if time.monotonic() - t >= seconds and runs:
                break
            time.sleep(0.5)
        stop.set()
        loop.join(max(deadline - time.monotonic(), 30))    # the run in progress goes on to its end
        windows["with_gc"] = (t, time.monotonic())
        cpu["with_gc"] = meter.delta(c, meter.read())
        out["gc_runs"], out["gc_errors"] = runs, errors
        wait_tombstones_gone(cluster, timeout=max(min(deadline - time.monotonic(), 600), 30))
        monitor.finish()
        profiler.stop()

        time.sleep(2.0)
        log(f"push: {seconds:.0f} s without GC again")
        t, c = time.monotonic(), meter.read()
        time.sleep(seconds)
        windows["after"] = (t, time.monotonic())
        cpu["after"] = meter.delta(c, meter.read())
    finally:
        session.stop()
        if monitor.is_alive():
            monitor.finish()

    out["windows_s"] = {k: round(b - a, 1) for k, (a, b) in windows.items()}
    for name, (a, b) in windows.items():
        out[name] = _push_summary(session.samples(a, b))
        out[name]["per_node"] = session.per_node(a, b)
        out[name]["cpu"] = cpu.get(name)
    out["by_phase"] = {}
    for seg in monitor.segments():
        if seg["phase"] in ("idle", "queued"):
            continue
        part = session.samples(seg["start"], seg["end"])
        key = f"{seg['phase']} ({seg['run'][-6:]})"
        out["by_phase"][key] = {"seconds": seg["seconds"], "manifest": gc_push.summary(part.manifest),
                                "image": gc_push.summary(part.image), "cpu": seg["cpu"]}
    out["timeline"] = monitor.timeline()
    found = cluster.view.blob_keys()
    out["dead_keys_left"] = sum(1 for b in dead.dead if b.digest in found)
    out["dead_files_left"] = gc_seed.files_present(cluster.data_dirs, dead.dead)
    out["ratios"] = {}
    for kind in ("manifest", "image", "blob"):
        for q in ("p50", "p99"):
            base, busy = out["before"][kind][f"{q}_ms"], out["with_gc"][kind][f"{q}_ms"]
            out["ratios"][f"{kind}_{q}"] = round(busy / base, 2) if base and busy else None


def _push_summary(samples: gc_push.Samples) -> dict:
    return {"images": len(samples.image), "manifest": gc_push.summary(samples.manifest),
            "image": gc_push.summary(samples.image), "blob": gc_push.summary(samples.blob),
            "errors": len(samples.errors), "error_samples": [e for _, e in samples.errors[:10]]}


# ------------------------------------------------------------------------------------------- report

def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    etcd_version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(), "etcd": etcd_version[0] if etcd_version else "?",
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


def _phase_rows(run: dict) -> list[str]:
    rows = []
    for seg in run.get("phases", []):
        if seg["phase"] in ("idle", "queued"):
            continue
        cpu = seg["cpu"]
        ours = ", ".join(f"{k} {v}" for k, v in cpu.items() if k not in ("wall_s", "machine_busy_pct", "others")
                         and v >= 0.5)
        rows.append(f"| {seg['phase']} | {seg['seconds']} s | swept {seg['swept'][0]}->{seg['swept'][1]}, "
                    f"tombstones {seg['tombstones'][0]}->{seg['tombstones'][1]} | {ours}; others {cpu['others']} | "
                    f"{cpu['machine_busy_pct']}% |")
    return rows


def report(results: dict) -> str:
    lines = []
    s = results.get("scale") or {}
    if s.get("state"):
        st = s["state"]
        lines += ["| scale | value |", "| --- | --- |",
                  f"| dataset | {st['dataset']['manifests']} manifests, {st['dataset']['live_blobs']} live + "
                  f"{st['dataset']['dead_blobs']} dead blobs ({st['dataset']['blob_records']} blob records), "
                  f"{st.get('etcd', {}).get('keys')} etcd keys, db {st.get('etcd', {}).get('db_mib')} MiB |",
                  f"| seed into etcd (nodes watching) | {st['seed']['seconds']} s ({st['seed']['puts_per_s']} puts/s); "
                  f"nodes caught up {st['absorb_s']} s later |"]
        if s.get("startup_s"):
            lines.append(f"| node start-up with that state | {s['startup_s']} s |")
            lines.append(f"| node VmRSS after start-up, MiB | {_rss_line(s.get('rss_after_restart_mib', {}))} |")
        for key, title in (("run_wait", "`gc run --wait`"), ("run_polled", "`gc run` + polling the record")):
            r = s.get(key)
            if not r:
                continue
            run = r["run"]
            lines += [f"| {title}: wall time | {r['wall_s']} s (target < {GC_TARGET_S:.0f} s) |",
                      f"| {title}: run `duration` | {run['duration']} s, state {run['state']} |",
                      f"| {title}: marked / candidates / swept | {run['marked']} / {run['candidates']} / "
                      f"{run['swept']} |",
                      f"| {title}: every tombstone gone | {r.get('tombstones_gone_s')} s after the request |"]
        for key in ("check", "check2"):
            if key in s:
                lines.append(f"| {key} (keys and files) | {'ok' if s[key]['ok'] else s[key]} |")
        for key in ("run_wait", "run_polled"):
            if s.get(key):
                lines += ["", f"{key}: | phase | time | progress | CPU seconds (ours; others) | machine busy |",
                          "| --- | --- | --- | --- | --- |", *_phase_rows(s[key])]
    p = results.get("push") or {}
    if p.get("ratios"):
        rate = p.get("push_rate")
        lines += ["", "Pushes: one client per node, " + (f"{rate} images/s each." if isinstance(rate, float)
                                                          else "back to back."),
                  "", "| push latency (ms) | before (no GC) | with GC | after (no GC) | with/before |",
                  "| --- | --- | --- | --- | --- |"]
        for kind in ("manifest", "image", "blob"):
            for q in ("p50", "p99"):
                lines.append(f"| {kind} {q} | {p['before'][kind][q + '_ms']} | {p['with_gc'][kind][q + '_ms']} | "
                             f"{p['after'][kind][q + '_ms']} | {p['ratios'][f'{kind}_{q}']} |")
        lines.append(f"| images pushed | {p['before']['images']} | {p['with_gc']['images']} | "
                     f"{p['after']['images']} | |")
        lines.append(f"| errors | {p['before']['errors']} | {p['with_gc']['errors']} | {p['after']['errors']} | |")
        lines.append(f"| window | {p['windows_s'].get('before')} s | {p['windows_s'].get('with_gc')} s | "
                     f"{p['windows_s'].get('after')} s | |")
        others = [p[w].get("cpu") or {} for w in ("before", "with_gc", "after")]
        lines.append("| machine busy | " + " | ".join(f"{c.get('machine_busy_pct')}%" for c in others) + " | |")
        lines.append("| other work on the machine, % of it | " + " | ".join(
            f"{round(100 * c['others'] / (c['wall_s'] * (os.cpu_count() or 1)))}%" if c else "?" for c in others)
            + " | |")
        lines += ["", "| GC phase | time | manifest p50 / p99 ms | image p50 / p99 ms |", "| --- | --- | --- | --- |"]
        for name, ph in p.get("by_phase", {}).items():
            lines.append(f"| {name} | {ph['seconds']} s | {ph['manifest']['p50_ms']} / {ph['manifest']['p99_ms']} | "
                         f"{ph['image']['p50_ms']} / {ph['image']['p99_ms']} |")
        lines.append(f"\nGC runs during the window: {p.get('gc_runs')}")
    return "\n".join(lines)


def _rss_line(values: dict) -> str:
    return ", ".join(f"{n} {v.get('VmRSS')}" for n, v in values.items())


def targets(results: dict) -> dict:
    s, p = results.get("scale") or {}, results.get("push") or {}
    out = {}
    if s.get("run_wait"):
        out["gc_run_wait_under_2_min"] = s["run_wait"]["wall_s"] < GC_TARGET_S
        out["scale_check_ok"] = bool(s.get("check", {}).get("ok"))
    if s.get("run_polled"):
        out["gc_run_polled_under_2_min"] = s["run_polled"]["wall_s"] < GC_TARGET_S
        out["scale_check2_ok"] = bool(s.get("check2", {}).get("ok"))
    if p.get("ratios"):
        out["manifest_p99_ratio_le_1_5"] = (p["ratios"]["manifest_p99"] or 99) <= P99_RATIO_TARGET
        out["image_p99_ratio_le_1_5"] = (p["ratios"]["image_p99"] or 99) <= P99_RATIO_TARGET
        out["no_push_errors"] = not any(p[w]["errors"] for w in ("before", "with_gc", "after"))
        out["push_dead_set_gone"] = p.get("dead_keys_left") == 0 and p.get("dead_files_left") == 0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cargohold GC benchmark (see bench/GC.md)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the data, 8 s push windows")
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument("--only", choices=["scale", "push"],
                        help="one phase (push still seeds the scale state, without restart or runs)")
    parser.add_argument("--manifests", type=int, help="number of manifests (3 live blobs each)")
    parser.add_argument("--dead", type=int, help="dead blobs of the scale phase")
    parser.add_argument("--push-seconds", type=float, help="length of the push windows without GC")
    parser.add_argument("--push-rate", type=float, default=0.0,
                        help="images/s per client (open loop); default 0: back to back (closed loop)")
    parser.add_argument("--push-dead", type=int, help="dead blobs for the push phase's GC runs")
    parser.add_argument("--gc-workers", type=int, default=16, help="gc_workers of the nodes (default 16)")
    parser.add_argument("--no-restart", action="store_true", help="skip the rolling restart (start-up time)")
    parser.add_argument("--no-second-run", action="store_true", help="skip the second scale run (polled)")
    parser.add_argument("--commit", metavar="REF",
                        help="run the nodes and the CLI from `git archive REF` (default: the working tree)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy record (--gil) the nodes: one start-up, and each GC phase of the leader")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a new temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="overall bound in seconds (default 3600)")
    args = parser.parse_args(argv)

    params = dict(QUICK if args.quick else FULL)
    for name in ("manifests", "dead", "push_seconds", "push_dead"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    params["push_rate"] = args.push_rate
    params["restart"] = not args.no_restart and args.only != "push"
    params["second_run"] = not args.no_second_run and args.only != "push"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cargohold-gcbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.timeout
    if args.commit:
        gc_cluster.SOURCE["dir"] = workdir / "src"
        source = export_commit_logged(args.commit, workdir / "src")
    else:
        source = "working tree at " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                                     capture_output=True, text=True).stdout.strip()
    results: dict = {"machine": {**machine(), "source": source},
                     "params": {**params, "gc_workers": args.gc_workers, "nodes": len(NODES)}}
    profiler = Profiler(args.profile)
    cluster = Cluster(workdir, gc_workers=args.gc_workers)
    alarm = threading.Timer(args.timeout, lambda: os.kill(os.getpid(), signal.SIGINT))
    alarm.daemon = True
    alarm.start()
    status = 0
    started = time.monotonic()
    try:
        log(f"workdir {workdir}; starting etcd and {len(NODES)} nodes ({source})")
        cluster.start()
        if args.only == "push":
            data = gc_seed.generate(label="scale", manifests=params["manifests"], dead=0, nodes=NODES)
            results["scale"] = {"state": {}}
            seed_state(cluster, data, results["scale"]["state"])
            results["scale"]["state"]["etcd"] = cluster.etcd_info()
        else:
            results["scale"] = {}
            scale_phase(cluster, params, profiler, deadline, results["scale"])
        if args.only != "scale":
            results["push"] = {}
            push_phase(cluster, params, profiler, deadline, results["push"])
        results["targets"] = targets(results)
        status = 0 if all(results["targets"].values()) else 1
    except BaseException as exc:  # noqa: BLE001 - report what we have, then clean up
        results["error"] = repr(exc)
        results["targets"] = targets(results)
        log(f"error: {exc!r}")
        for n, node in cluster.nodes.items():
            log(f"{n} log tail:\n{node.log_tail(8)}")
        status = 2
    finally:
        alarm.cancel()
        profiler.stop()
        results["profiles"] = profiler.results
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        cluster.close()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results.get("targets", {}), indent=2))
    print(report(results))
    return status


def export_commit_logged(ref: str, dest: Path) -> str:
    commit = gc_cluster.export_commit(ref, dest)
    log(f"running cargohold from an export of {ref} ({commit[:10]}) in {dest}")
    return commit


if __name__ == "__main__":
    sys.exit(main())
