"""Garbage collection (issue 5): a run over 100,000 blobs, and push latency while GC runs.

1. **scale** (target: a run under 2 minutes). One etcd and three nodes on loopback. A state
   of 100,000 blobs (60,000 referenced by 20,000 tagged manifests, 40,000 unreferenced and
   older than the grace period; 2 copies each) is written straight into etcd
   (scenarios/gc_seed.py) while the nodes run, and the files onto their owners' disks. Measured:
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

--quick: 2,000 manifests, 4,000 dead blobs, 8 s push windows, 3,000 dead blobs for push.
Every wait is bounded (--timeout). bench/GC.md says what and why.
"""


from __future__ import annotations

import json
import os
import signal
import threading
import time

from bench.report import Row, log
from bench.scenarios import gc_push, gc_seed
from bench.scenarios.gc_cluster import NODES, CpuMeter, GcCluster, RunMonitor
from bench.profiler import Profiler

FULL = {"manifests": 20000, "dead": 40000, "push_seconds": 30.0, "push_dead": 20000, "push_max_seconds": 900.0}
QUICK = {"manifests": 2000, "dead": 4000, "push_seconds": 8.0, "push_dead": 3000, "push_max_seconds": 120.0}
GC_TARGET_S = 120.0
P99_RATIO_TARGET = 1.5
FINISHED = ("done", "failed")


# ------------------------------------------------------------------------------------------- steps

def seed_state(cluster: GcCluster, data: gc_seed.Dataset, out: dict) -> None:
    out["dataset"] = data.counts()
    log(f"writing {data.counts()} as files on the owners' disks")
    out["files"] = gc_seed.write_files(data, cluster.data_dirs)
    log("seeding etcd (the nodes run: their watches absorb it)")
    out["seed"] = gc_seed.seed(cluster.etcd.url, cluster.name, data)
    out["absorb_s"] = cluster.wait_absorbed(out["seed"]["revision"], timeout=600)
    log(f"seeded: {out['seed']}; every node's read model caught up after {out['absorb_s']} s")


def wait_tombstones_gone(cluster: GcCluster, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.view.tombstones() == 0:
            return True
        time.sleep(0.5)
    return cluster.view.tombstones() == 0


def measured_run(cluster: GcCluster, profiler: Profiler, label: str, *, wait_cli: bool, deadline: float) -> dict:
    """One GC run, requested with `gc run --wait --json` (wait_cli) or `gc run --json` and then
    followed by reading its record; monitored until every tombstone is gone."""
    out: dict = {"how": "gc run --wait --json" if wait_cli else "gc run --json, then the run record polled"}
    leader = cluster.view.leader()
    out["leader_before"] = leader
    slow_before = cluster.etcd_slow_applies()
    monitor = RunMonitor(cluster, profiler, label=label)
    for n, node in cluster.nodes.items():
        if n != leader:
            profiler.add(f"{label}-{n}", node.pid)
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
    out["etcd_slow_applies"] = cluster.etcd_slow_applies() - slow_before
    out["phases"] = [{k: v for k, v in seg.items() if k not in ("start", "end")} for seg in monitor.segments()]
    out["timeline"] = monitor.timeline()
    out["rss_after_mib"] = cluster.node_rss()
    return out


def verify(cluster: GcCluster, live: list[gc_seed.Blob], dead: list[gc_seed.Blob]) -> dict:
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

def scale_phase(cluster: GcCluster, params: dict, profiler: Profiler, deadline: float, out: dict) -> None:
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
            t0 = time.monotonic()
            node.start(timeout=max(min(deadline - time.monotonic(), 900), 30))
            out["startup_s"][n] = round(time.monotonic() - t0, 2)
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


def seed_dead_set(cluster: GcCluster, label: str, count: int, repo_prefix: str, out: dict):
    """Seed `count` new unreferenced blobs (no manifests), then let the nodes' watches settle."""
    dead = gc_seed.generate(label=label, manifests=0, dead=count, nodes=NODES, repo_prefix=repo_prefix)
    seed_state(cluster, dead, out)
    time.sleep(3.0)
    return dead


def gc_loop(cluster: GcCluster, stop: threading.Event, runs: list[dict], errors: list[str]) -> None:
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


def push_phase(cluster: GcCluster, params: dict, profiler: Profiler, deadline: float, out: dict) -> None:
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
    meter = CpuMeter(cluster)
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
                profiler.add(f"push-{n}", node.pid)
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


# ------------------------------------------------------------------------------------------- scenario

def add_arguments(ap) -> None:
    ap.add_argument("--manifests", type=int, help="number of manifests (3 live blobs each)")
    ap.add_argument("--dead", type=int, help="dead blobs of the scale phase")
    ap.add_argument("--push-seconds", type=float, help="length of the push windows without GC")
    ap.add_argument("--push-rate", type=float, default=0.0,
                    help="images/s per client (open loop); default 0: back to back (closed loop)")
    ap.add_argument("--push-dead", type=int, help="dead blobs for the push phase's GC runs")
    ap.add_argument("--gc-workers", type=int, default=16, help="gc_workers of the nodes (default 16)")
    ap.add_argument("--no-restart", action="store_true", help="skip the rolling restart (start-up time)")
    ap.add_argument("--no-second-run", action="store_true", help="skip the second scale run (polled)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="overall bound in seconds (default 3600)")


def prepare(ctx) -> None:
    args = ctx.args
    params = dict(QUICK if args.quick else FULL)
    for name in ("manifests", "dead", "push_seconds", "push_dead"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    params |= {"push_rate": args.push_rate, "restart": not args.no_restart, "second_run": not args.no_second_run,
               "gc_workers": args.gc_workers, "nodes": len(NODES)}
    ctx.details["params"] = params
    ctx.deadline = time.monotonic() + args.timeout
    ctx.alarm = threading.Timer(args.timeout, lambda: os.kill(os.getpid(), signal.SIGINT))
    ctx.alarm.daemon = True
    ctx.alarm.start()
    ctx.profiler = Profiler(ctx.pyspy, ctx.profile_dir, "gc", mode="gil", rate=50).start()
    ctx.cluster = GcCluster(ctx.base / "cluster", gc_workers=args.gc_workers)
    log(f"starting etcd and {len(NODES)} nodes")
    ctx.cluster.start()


def finish(ctx) -> None:
    if getattr(ctx, "alarm", None):
        ctx.alarm.cancel()
    if getattr(ctx, "profiler", None):
        ctx.details["profiles"] = ctx.profiler.stop()
    if getattr(ctx, "cluster", None):
        ctx.cluster.close()


def _logged_failure(ctx, exc: BaseException) -> None:
    log(f"error: {exc!r}")
    for n, node in ctx.cluster.nodes.items():
        log(f"{n} log tail:\n{node.log_tail(8)}")


def scale(ctx) -> list[Row]:
    out = ctx.details["scale"] = {}
    try:
        scale_phase(ctx.cluster, ctx.details["params"], ctx.profiler, ctx.deadline, out)
    except Exception as exc:
        _logged_failure(ctx, exc)
        return scale_rows(out) + [Row("scale", "(failed)", None, error=repr(exc))]
    return scale_rows(out)


def push(ctx) -> list[Row]:
    params = ctx.details["params"]
    if "scale" not in ctx.details:       # push alone still works on the 20,000-manifest state
        data = gc_seed.generate(label="scale", manifests=params["manifests"], dead=0, nodes=NODES)
        state = ctx.details["scale"] = {"state": {}}
        seed_state(ctx.cluster, data, state["state"])
        state["state"]["etcd"] = ctx.cluster.etcd_info()
    out = ctx.details["push"] = {}
    try:
        push_phase(ctx.cluster, params, ctx.profiler, ctx.deadline, out)
    except Exception as exc:
        _logged_failure(ctx, exc)
        return [Row("push", "(failed)", None, error=repr(exc))]
    return push_rows(out)


PARTS = {"scale": scale, "push": push}


# ------------------------------------------------------------------------------------------- rows

def _run_rows(title: str, r: dict) -> list[Row]:
    run = r["run"]
    return [
        Row("scale", f"{title}: wall time", r["wall_s"], "s", f"< {GC_TARGET_S:.0f} s", r["wall_s"] < GC_TARGET_S,
            note=f"run duration {run['duration']} s, state {run['state']}; marked / candidates / swept "
                 f"{run['marked']} / {run['candidates']} / {run['swept']}; every tombstone gone "
                 f"{r.get('tombstones_gone_s')} s after the request"),
        *(Row("scale", f"{title}: {seg['phase']}", seg["seconds"], "s",
              note=f"swept {seg['swept'][0]}->{seg['swept'][1]}; CPU-s " + ", ".join(
                  f"{k} {v}" for k, v in seg["cpu"].items() if k not in ("wall_s", "machine_busy_pct") and v >= 0.5)
              + f"; machine busy {seg['cpu']['machine_busy_pct']}%")
          for seg in r.get("phases", []) if seg["phase"] not in ("idle", "queued")),
    ]


def scale_rows(s: dict) -> list[Row]:
    rows: list[Row] = []
    if s.get("state"):
        st, d = s["state"], s["state"]["dataset"]
        rows.append(Row("scale", "seed into etcd (nodes watching)", st["seed"]["seconds"], "s",
                        note=f"{d['manifests']} manifests, {d['live_blobs']} live + {d['dead_blobs']} dead blobs, "
                             f"{st.get('etcd', {}).get('keys')} etcd keys, db {st.get('etcd', {}).get('db_mib')} MiB; "
                             f"{st['seed']['puts_per_s']} puts/s; nodes caught up {st['absorb_s']} s later"))
    if s.get("startup_s"):
        rows.append(Row("scale", "node start-up with that state (slowest)", max(s["startup_s"].values()), "s",
                        note=f"{s['startup_s']}; VmRSS MiB after: "
                             + ", ".join(f"{n} {v['VmRSS']}" for n, v in s.get("rss_after_restart_mib", {}).items())))
    for key, title in (("run_wait", "gc run --wait"), ("run_polled", "gc run + polling the record")):
        if s.get(key):
            rows += _run_rows(title, s[key])
    for key in ("check", "check2"):
        if key in s:
            rows.append(Row("scale", f"{key}: keys and files", "ok" if s[key]["ok"] else "WRONG", "",
                            "all gone / intact", s[key]["ok"], note="" if s[key]["ok"] else str(s[key])))
    return rows


def push_rows(p: dict) -> list[Row]:
    """Latency with GC, the no-GC window before it as the same-run peer."""
    rate = p.get("push_rate")
    how = f"{rate} images/s per client" if isinstance(rate, float) else "back to back"
    rows = []
    for kind in ("manifest", "image", "blob"):
        for q in ("p50", "p99"):
            judged = q == "p99" and kind != "blob"
            ratio = p["ratios"][f"{kind}_{q}"]
            rows.append(Row("push", f"{kind} {q} with GC (peer: before, no GC)", p["with_gc"][kind][f"{q}_ms"], "ms",
                            f"<= {P99_RATIO_TARGET}x" if judged else "info",
                            (ratio or 99) <= P99_RATIO_TARGET if judged else None,
                            note=f"after GC (no GC again): {p['after'][kind][f'{q}_ms']} ms" if judged else "",
                            peer=p["before"][kind][f"{q}_ms"]))
    errors = sum(p[w]["errors"] for w in ("before", "with_gc", "after"))
    rows.append(Row("push", "images pushed with GC / push errors", p["with_gc"]["images"], "images",
                    "0 errors", errors == 0,
                    note=f"one client per node, {how}; windows {p['windows_s']} s; before {p['before']['images']}, "
                         f"after {p['after']['images']}; errors {errors}; GC runs {len(p.get('gc_runs', []))}; "
                         f"dead keys left {p.get('dead_keys_left')}, files left {p.get('dead_files_left')}"))
    return rows
