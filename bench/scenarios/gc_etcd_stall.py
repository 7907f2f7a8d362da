"""Repro: an etcd stall of ~12 s during a GC sweep; the GC leader's node once exited, it must not.

Seen first in the gc scenario at full size, where etcd 3.4's paged range reads (see the
gc_etcd_range scenario) held up writes for more than 5 s: the leader's txn failed with
DEADLINE_EXCEEDED (EtcdUnavailable), `GarbageCollector.execute` caught it and tried to write
the run record as failed (`_put_run`), that txn failed the same way, and the exception left
`GarbageCollector.run` and the node's task group: the node exited. Another node's
`_campaign` txn failed the same way and took that node down too.

Here the stall is made on purpose: one etcd and one node on loopback, a dead set seeded
straight into etcd (scenarios/gc_seed.py), `cargohold gc run`, and when the run reaches its sweep,
etcd gets SIGSTOP for `--stall` seconds, then SIGCONT. Then: is the node still running, what
does its log say, and what state did the run end in. Fixed since: the node must survive.
"""

from __future__ import annotations

import os
import signal
import time

from bench.launch import Cluster
from bench.report import Row, log
from bench.scenarios import gc_seed
from bench.scenarios.gc_cluster import CLUSTER, GcView


def add_arguments(ap) -> None:
    ap.add_argument("--stall", type=float, default=12.0, help="seconds etcd stays stopped (default 12)")
    ap.add_argument("--dead", type=int, default=20000, help="dead blobs to sweep (default 20000)")


def _wait_for_sweep(view: GcView, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = view.run(run_id) or {}
        if run.get("phase") == "sweep" and run.get("swept", 0) > 0:
            break
        time.sleep(0.1)
    return run


def _stall(etcd_pid: int, seconds: float) -> None:
    os.kill(etcd_pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(etcd_pid, signal.SIGCONT)


def stall(ctx) -> list[Row]:
    with Cluster(ctx.base / "stall", CLUSTER, {"gc_grace": "10m"}) as cluster:
        node = cluster.add("n1")
        view = GcView(cluster.etcd, CLUSTER)
        data = gc_seed.generate(label="stall", manifests=0, dead=ctx.args.dead, nodes=["n1"], replicas=1)
        log(f"seeded {gc_seed.seed(cluster.etcd.url, CLUSTER, data)}")
        time.sleep(2)
        run_id = cluster.cli_json("gc", "run")["run"]
        run = _wait_for_sweep(view, run_id)
        log(f"run {run_id} in {run.get('phase')} (swept {run.get('swept')}): SIGSTOP etcd for {ctx.args.stall} s")
        _stall(cluster.etcd.pid, ctx.args.stall)
        log("SIGCONT etcd")
        for _ in range(60):
            if not node.alive():
                break
            time.sleep(0.5)
        run = view.run(run_id) or {}
        alive = node.alive()
        tail = [line for line in node.log_tail(400).splitlines()
                if any(w in line for w in ("cargohold/", "Error", "Unavailable", "WARNING", "ERROR"))]
        ctx.details["stall"] = {"alive": alive, "exit_code": node.proc.poll() if node.proc else None,
                                "run": run, "log": tail[-40:]}
        log("node log (filtered):\n" + "\n".join(tail[-40:]))
    return [Row("stall", f"GC leader alive 30 s after a {ctx.args.stall:g} s etcd stall in the sweep",
                "yes" if alive else "NO", "", "alive", alive,
                note=f"run {run_id}: state {run.get('state')}, phase {run.get('phase')}, swept {run.get('swept')}, "
                     f"error {run.get('error')!r}")]


PARTS = {"stall": stall}
