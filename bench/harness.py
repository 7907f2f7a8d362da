"""cargohold benchmarks: `python -m bench SCENARIO [options]` (`--help` after a scenario).

The harness gives every scenario common options, a scratch directory, its parts in order,
one table and one JSON file. Exit status 1 when a target fails or a part errors.

A scenario module has a docstring (its first line is its `--list` entry), `PARTS` (name ->
function(ctx) returning rows, run in that order; `--only` picks some), and optionally
`PEER` (the column label of the same-run peer), `add_arguments(parser)`, `prepare(ctx)` and
`finish(ctx)` (always called at the end)."""

from __future__ import annotations

import argparse
import importlib
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench import launch, procs, report

SCENARIOS = ["registry", "auth_overhead", "cluster", "sites", "gc", "gc_etcd_range", "gc_etcd_stall",
             "pullthrough", "virtual"]


@dataclass
class Ctx:
    args: argparse.Namespace
    base: Path                                  # scratch directory of this run
    details: dict = field(default_factory=dict)  # raw measurements, written to the JSON

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def pyspy(self) -> str | None:
        """The py-spy binary when profiling was asked for (--profile DIR), else None."""
        return self.args.py_spy if self.args.profile else None

    @property
    def profile_dir(self) -> Path:
        return Path(self.args.profile or self.base / "profiles")

    def log(self, msg: str) -> None:
        report.log(msg)


def load(name: str):
    return importlib.import_module(f"bench.scenarios.{name}")


def list_scenarios() -> str:
    lines = []
    for name in SCENARIOS:
        module = load(name)
        lines.append(f"{name:15} {module.__doc__.strip().splitlines()[0]}  [{', '.join(module.PARTS)}]")
    return "\n".join(lines)


def parser_for(name: str, module) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m bench {name}", description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help=f"parts (repeat or comma list): {', '.join(module.PARTS)}")
    ap.add_argument("--quick", action="store_true", help="small sizes (see the scenario's description)")
    ap.add_argument("--json", metavar="FILE", help="JSON output (default bench/results/<scenario>-<time>.json)")
    ap.add_argument("--commit", metavar="REF", help="run nodes and CLI from `git archive REF cargohold`")
    ap.add_argument("--source", metavar="DIR", help="run nodes and CLI from another tree's cargohold")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record the nodes while measured; stacks into DIR")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", help="py-spy binary")
    ap.add_argument("--workdir", help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, data)")
    if hasattr(module, "add_arguments"):
        module.add_arguments(ap)
    return ap


def choose_tree(ap: argparse.ArgumentParser, args, base: Path) -> None:
    if args.commit and args.source:
        ap.error("--commit and --source are exclusive")
    if args.commit:
        launch.Tree.root, launch.Tree.commit = procs.export_commit(args.commit, base)
    elif args.source:
        root = Path(args.source).resolve()
        root = root.parent if root.name == "cargohold" and (root / "__init__.py").exists() else root
        if not (root / "cargohold" / "__init__.py").exists():
            ap.error(f"--source {args.source}: no cargohold package there")
        launch.Tree.root = root


def run_parts(module, names: list[str], ctx: Ctx) -> list[report.Row]:
    rows: list[report.Row] = []
    try:
        for name in names:
            t0 = time.perf_counter()
            print(f"\n=== {name} ===", flush=True)
            try:
                rows += module.PARTS[name](ctx)
            except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
                traceback.print_exc()
                rows.append(report.failed(name, e))
            print(f"=== {name}: {time.perf_counter() - t0:.0f}s ===", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; every process was stopped; partial results follow")
    return rows


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.splitlines()[0] + "\n\n" + list_scenarios())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SCENARIOS:
        print(f"unknown scenario {name!r}; `python -m bench --list`", file=sys.stderr)
        return 2
    module = load(name)
    ap = parser_for(name, module)
    args = ap.parse_args(rest)
    names = [n for o in args.only for n in o.split(",") if n] or list(module.PARTS)
    if unknown := [n for n in names if n not in module.PARTS]:
        ap.error(f"unknown part(s) {unknown}; choose from {list(module.PARTS)}")
    signal.signal(signal.SIGTERM, _terminate)   # `timeout` unwinds like Ctrl-C: processes stopped
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"cargohold-bench-{name}-"))
    base.mkdir(parents=True, exist_ok=True)
    choose_tree(ap, args, base)
    ctx = Ctx(args, base)
    info = procs.machine_info() | {"scenario": name, "argv": argv, "tree": str(launch.Tree.root),
                                   "tree_commit": launch.Tree.commit}
    print(f"machine: {info['nproc']} cpus ({info['cpu_model']}), load {info['loadavg_start']}; "
          f"cargohold from {launch.Tree.root} at {launch.Tree.commit or info['git_commit']}"
          + (" + uncommitted changes" if info["cargohold_uncommitted"] and not launch.Tree.commit else ""))
    print(f"scratch: {base}")
    t0 = time.perf_counter()
    try:
        if hasattr(module, "prepare"):
            module.prepare(ctx)
        rows = run_parts(module, names, ctx)
    finally:
        if hasattr(module, "finish"):
            module.finish(ctx)
        if args.keep or args.workdir:
            print(f"scratch kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    info |= {"loadavg_end": procs.loadavg(), "seconds": round(time.perf_counter() - t0, 1), "quick": args.quick}
    print("\n" + report.table(rows, getattr(module, "PEER", "peer")))
    print(f"\n{info['date']}; load {'/'.join(info['loadavg_start'])} -> {'/'.join(info['loadavg_end'])}; "
          f"{info['seconds']:.0f}s" + ("; QUICK" if args.quick else ""))
    path = report.write_json(name, rows, ctx.details, info, Path(args.json) if args.json else None)
    print(f"JSON written to {path}")
    return 1 if any(r.verdict in ("FAIL", "ERROR") for r in rows) else 0
