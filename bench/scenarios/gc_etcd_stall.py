"""Repro: an etcd stall of ~12 s during a GC sweep makes the GC leader's node process exit.

    /work/venv/bin/python bench/gc_etcd_stall.py [--stall 12] [--dead 20000] [--commit REF]

Seen first in bench/gc.py at full size, where etcd 3.4's paged range reads (see
bench/gc_etcd_range.py) held up writes for more than 5 s: the leader's txn failed with
DEADLINE_EXCEEDED (EtcdUnavailable), `GarbageCollector.execute` caught it and tried to write
the run record as failed (`_put_run`), that txn failed the same way, and the exception left
`GarbageCollector.run` and the node's task group: the node exited. Another node's
`_campaign` txn failed the same way and took that node down too.

Here the stall is made on purpose: one etcd and one node on loopback, a dead set seeded
straight into etcd (bench/gc_seed.py), `cargohold gc run`, and when the run reaches its sweep,
etcd gets SIGSTOP for `--stall` seconds, then SIGCONT. Then: is the node still running, what
does its log say, and what state did the run end in.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import gc_cluster  # noqa: E402
import gc_seed  # noqa: E402
from gc_cluster import CLUSTER, EtcdView, Node, log  # noqa: E402
from tests.support.etcd import EtcdProcess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stall", type=float, default=12.0, help="seconds etcd stays stopped (default 12)")
    parser.add_argument("--dead", type=int, default=20000, help="dead blobs to sweep (default 20000)")
    parser.add_argument("--commit", metavar="REF", help="run cargohold from `git archive REF`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cargohold-stall-") as tmp:
        work = Path(tmp)
        if args.commit:
            gc_cluster.SOURCE["dir"] = work / "src"
            log(f"cargohold from {gc_cluster.export_commit(args.commit, work / 'src')[:10]}")
        etcd = EtcdProcess(work / "etcd")
        etcd.start()
        config = work / "node.yaml"
        config.write_text("gc_grace: 10m\naccess_log: false\nlog_level: warning\n")
        node = Node(work / "n1", etcd_url=etcd.url, cluster=CLUSTER, node_id="n1", extra_args=["--config", str(config)])
        view = EtcdView(etcd.url, CLUSTER)
        stopped = False
        try:
            node.start(timeout=60)
            data = gc_seed.generate(label="stall", manifests=0, dead=args.dead, nodes=["n1"], replicas=1)
            log(f"seeded {gc_seed.seed(etcd.url, CLUSTER, data)}")
            time.sleep(2)
            cli = [gc_cluster.PYTHON, "-m", "cargohold", "gc", "run", "--json", "--etcd", etcd.url, "--cluster", CLUSTER]
            run_id = json.loads(subprocess.run(cli, cwd=gc_cluster.SOURCE["dir"], env=gc_cluster.source_env(),
                                               capture_output=True, text=True, timeout=60).stdout)["run"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                run = view.run(run_id) or {}
                if run.get("phase") == "sweep" and run.get("swept", 0) > 0:
                    break
                time.sleep(0.1)
            log(f"run {run_id} in {run.get('phase')} (swept {run.get('swept')}): SIGSTOP etcd for {args.stall} s")
            etcd._proc.send_signal(signal.SIGSTOP)
            stopped = True
            time.sleep(args.stall)
            etcd._proc.send_signal(signal.SIGCONT)
            stopped = False
            log("SIGCONT etcd")
            for _ in range(60):
                if not node.alive():
                    break
                time.sleep(0.5)
            run = view.run(run_id) or {}
            alive = node.alive()
            print(f"node alive 30 s after the stall: {alive} (exit code {node.proc.poll()})")
            print(f"run {run_id}: state {run.get('state')}, phase {run.get('phase')}, swept {run.get('swept')}, "
                  f"error {run.get('error')!r}")
            tail = [line for line in node.log_tail(400).splitlines()
                    if "cargohold/" in line or "Error" in line or "Unavailable" in line or "WARNING" in line
                    or "ERROR" in line]
            print("node log (filtered):\n" + "\n".join(tail[-40:]))
            return 0 if alive else 1
        finally:
            if stopped:
                etcd._proc.send_signal(signal.SIGCONT)
            node.stop(timeout=20)
            view.close()
            etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
