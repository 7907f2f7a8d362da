#!/usr/bin/env python3
"""cargohold vs CNCF Distribution (Debian docker-registry), same machine, same run.

    /work/venv/bin/python bench/run.py [--only NAME[,NAME]] [--quick] [--json out.json]

Run by hand; never part of the test suite.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmarks  # noqa: E402
import servers  # noqa: E402
from benchmarks import BENCHMARKS, Ctx, Row  # noqa: E402


def machine_info() -> dict:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"

    try:
        commit = subprocess.run(["git", "-C", str(servers.REPO_ROOT), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "?"
    try:
        dirty = bool(subprocess.run(["git", "-C", str(servers.REPO_ROOT), "status", "--porcelain",
                                     "--", "cargohold"], capture_output=True, text=True).stdout)
    except Exception:  # noqa: BLE001
        dirty = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cargohold_tree_dirty": dirty,
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "mem_total_mb": _meminfo_mb(),
        "python": sys.version.split()[0],
        "distribution": ver([servers.DISTRIBUTION_BIN, "--version"]),
        "wrk": ver(["wrk", "-v"]),
        "curl": ver(["curl", "--version"]),
        "git_commit": commit,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def _meminfo_mb() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def fmt_val(v, unit) -> str:
    if v is None:
        return "-"
    if unit == "cpu-s/GB":
        return f"{v:.3f} {unit}"
    if unit in ("req/s", "MB/s"):
        return f"{v:,.0f} {unit}"
    return f"{v:,.2f} {unit}" if unit == "ms" else f"{v:,.1f} {unit}"


def table(rows: list[Row], labels=("cargohold", "distribution")) -> str:
    head = ["benchmark", "metric", labels[0], labels[1], "ratio", "target", "result"]
    body = []
    for r in rows:
        ratio = r.ratio
        body.append([r.benchmark, r.metric, fmt_val(r.values.get("cargohold"), r.unit),
                     fmt_val(r.values.get("distribution"), r.unit),
                     "-" if ratio is None else f"{ratio:.2f}x", r.target, r.verdict])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line(head), sep, *(line(b) for b in body)]
    notes = [f"- {r.benchmark} / {r.metric}: {r.note}" for r in rows if r.note]
    errs = [f"- {r.benchmark} / {r.metric}: ERROR {r.error}" for r in rows if r.error]
    return "\n".join(out + [""] + notes + errs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[],
                    help=f"run only these (repeat or comma list): {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 32 MiB blobs, 3 s wrk, 1,000 repos")
    ap.add_argument("--json", metavar="FILE", help="write rows + details as JSON")
    ap.add_argument("--rounds", type=int, default=1,
                    help="A/B rounds per benchmark, alternating order; medians (default 1)")
    ap.add_argument("--no-pin", action="store_true",
                    help="manifest_get: don't pin the registry and wrk to separate cores")
    ap.add_argument("--runtime", default="asyncio",
                    help="cargohold --runtime (default asyncio; passed only if supported)")
    ap.add_argument("--mem-repos", type=int, help="memory: repositories (default 10000)")
    ap.add_argument("--mem-timeout", type=float, help="memory: indexing deadline in seconds")
    ap.add_argument("--profile", metavar="DIR",
                    help="py-spy record every cargohold run into DIR and print top functions")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy",
                    help="py-spy binary (default: from PATH)")
    ap.add_argument("--workdir", help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--self-compare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    names = [n for o in args.only for n in o.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    for tool in ("wrk", "curl", "taskset", servers.DISTRIBUTION_BIN):
        if not shutil.which(tool):
            ap.error(f"{tool} not found")

    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cargohold-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(base=base, quick=args.quick, rounds=max(1, args.rounds), pin=not args.no_pin,
              mem_repos=args.mem_repos, mem_timeout=args.mem_timeout,
              profile_dir=Path(args.profile).resolve() if args.profile else None,
              pyspy=args.py_spy)

    need_gb = 2 if args.quick else 8
    free_gb = shutil.disk_usage(base).free / 1e9
    if free_gb < need_gb:
        print(f"only {free_gb:.1f} GB free under {base}; this run needs about {need_gb} GB "
              f"(generated blobs + one server's data at a time). Free space or use --workdir.")
        shutil.rmtree(base, ignore_errors=True) if not args.workdir else None
        return 2
    info = machine_info()
    print(f"machine: {info['nproc']} cpus ({info['cpu_model']}), load {info['loadavg_start']}, "
          f"{info['distribution']}, {info['wrk']}")
    print(f"cargohold at commit {info['git_commit']}"
          + (" + uncommitted changes under cargohold/" if info["cargohold_tree_dirty"] else ""))
    print(f"scratch: {base}")
    if args.self_compare:
        ctx.kinds["cargohold"] = "distribution"
        ctx.runtime = None
        print("SELF-COMPARE: both sides are docker-registry (plumbing check; ratios should be ~1)")
    else:
        ok, text = servers.cargohold_help()
        if not ok:
            print("cargohold: `python -m cargohold serve --help` fails; its side will error:\n  "
                  + "\n  ".join(text.strip().splitlines()[-5:]))
        ctx.runtime = args.runtime if (ok and "--runtime" in text) else None
        print(f"cargohold: runtime flag {'--runtime ' + ctx.runtime if ctx.runtime else '(not passed)'}")

    rows: list[Row] = []
    t_all = time.perf_counter()
    try:
        for name in names:
            t0 = time.perf_counter()
            print(f"\n=== {name} ===", flush=True)
            try:
                rows += BENCHMARKS[name](ctx)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append(Row(name, "(benchmark failed)", "", {}, error=f"{type(e).__name__}: {e}"))
            print(f"=== {name}: {time.perf_counter() - t0:.0f}s ===", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped; partial results follow")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
        elif args.keep:
            print(f"scratch kept: {base}")

    info["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    info["seconds"] = round(time.perf_counter() - t_all, 1)
    labels = ("cargohold", "distribution")
    if args.self_compare:
        labels = ("distribution#2", "distribution")
    print("\n" + table(rows, labels))
    print(f"\n{info['date']}; {info['nproc']} cpus {info['cpu_model']}; load "
          f"{'/'.join(info['loadavg_start'])} -> {'/'.join(info['loadavg_end'])}; "
          f"{info['seconds']:.0f}s total" + ("; QUICK" if args.quick else ""))

    if args.json:
        doc = {"machine": info, "quick": args.quick, "self_compare": args.self_compare,
               "rounds": ctx.rounds, "rows": [r.as_dict() for r in rows], "details": ctx.raw}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"JSON written to {args.json}")
    failed = any(r.verdict in ("FAIL", "ERROR") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
