"""`cargohold gc run|status` and `cargohold retention rules set|list`."""

from __future__ import annotations

import json
import time

import anyio

from cargohold.cli.options import (
    cluster_command, end_progress, etcd_client, load_metadata, print_rules, progress_bar, read_rules_file, report,
    show_progress,
)
from cargohold.coordinator import policies as policy_rules
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.gc.collector import FINISHED, new_run


def register(sub) -> None:
    """Add `gc run|status` and `retention rules set|list` to the top-level subparsers."""
    gc = sub.add_parser("gc", help="garbage collection: run, status")
    actions = gc.add_subparsers(dest="action", required=True)
    p = actions.add_parser("run", help="one cluster-wide mark-and-sweep (online: pushes go on)")
    p.add_argument("--dry-run", action="store_true", help="report what would be freed; free nothing")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish, showing progress")
    cluster_command(p, gc_run)
    cluster_command(actions.add_parser("status", help="the leader and the latest run's progress"), gc_status)

    retention = sub.add_parser("retention", help="retention and immutable-tag rules")
    rules = retention.add_subparsers(dest="what", required=True).add_parser("rules", help="the rules")
    actions = rules.add_subparsers(dest="action", required=True)
    p = actions.add_parser("set", help="store the rules file (YAML or JSON: retention: [...], immutable: [...])")
    p.add_argument("file")
    cluster_command(p, retention_set)
    cluster_command(actions.add_parser("list", help="show the stored rules"), retention_list)


def _latest(metadata: ClusterMetadata) -> dict | None:
    runs = sorted(metadata.gc_runs().values(), key=lambda r: r.get("requested", 0))
    return runs[-1] if runs else None


def _describe(run: dict) -> str:
    lines = [f"run {run['id']}: {run['state']} ({run.get('phase')}){' dry run' if run.get('dry_run') else ''}"
             f", leader {run.get('leader', '-')}"]
    lines.append(f"  marked {run.get('marked', 0)} live blobs, candidates {run.get('candidates', 0)} "
                 f"({run.get('candidate_bytes', 0)} bytes)")
    if run.get("dry_run"):
        would = run.get("would_free", {})
        lines.append(f"  would free {would.get('blobs', 0)} blobs, {would.get('bytes', 0)} bytes, "
                     f"{would.get('manifests', 0)} untagged manifests; retention would delete "
                     f"{run.get('retention_planned', 0)} tags")
        for item in run.get("retention", [])[:50]:
            lines.append(f"    {item['repository']}:{item['tag']}  ({item['rule']})")
    else:
        lines.append(f"  swept {run.get('swept', 0)} blobs, freed {run.get('bytes_freed', 0)} bytes, "
                     f"deleted {run.get('manifests_deleted', 0)} manifests and {run.get('tags_deleted', 0)} tags")
        if run.get("tombstones_left"):
            lines.append(f"  {run['tombstones_left']} condemned copies not yet released (on nodes that are "
                         "down or slow); their tombstones stay until they are")
    if run.get("duration") is not None:
        lines.append(f"  took {run['duration']:.1f}s")
    if run.get("error"):
        lines.append(f"  error: {run['error']}")
    return "\n".join(lines)


def _progress_line(run: dict, started: float) -> str:
    done = run.get("swept", 0) + run.get("manifests_deleted", 0)
    total = max(run.get("candidates", 0) + run.get("dead_manifests", 0), 1)
    elapsed = max(time.monotonic() - started, 0.001)
    rate = done / elapsed
    eta = (total - done) / rate if rate > 0 and run.get("phase") == "sweep" else None
    eta_text = f", about {eta:.0f}s left" if eta is not None else ""
    if run.get("phase") == "cleanup" and run.get("tombstones_left") is not None:
        eta_text += f", {run['tombstones_left']} copies left to release"
    return (f"gc {run['id']} {run.get('phase'):>9} {progress_bar(done, total)} "
            f"{done}/{total} swept, {run.get('bytes_freed', 0)} bytes freed, {rate:.0f}/s{eta_text}")


async def gc_run(args) -> int:
    async with etcd_client(args) as client:
        metadata = ClusterMetadata(client, args.cluster, node_id="cli")
        run = new_run(dry_run=args.dry_run)
        await metadata.request_gc_run(run)
        if not args.wait:
            report(args, {"run": run["id"], "state": "requested"},
                   f"gc run {run['id']} requested; `cargohold gc status` shows its progress")
            return 0
        final = await _follow(metadata, run["id"], show=not args.json)
    print(json.dumps(final, indent=2) if args.json else _describe(final))
    return 0 if final["state"] == "done" else 1


async def _follow(metadata: ClusterMetadata, run_id: str, show: bool) -> dict:
    with metadata.changes(lambda _blobs, sections: "gc" in sections) as changed:
        return await _show_run(metadata, run_id, show, changed)


async def _show_run(metadata: ClusterMetadata, run_id: str, show: bool, changed) -> dict:
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(metadata.run)
        while True:
            run = metadata.gc_runs().get(run_id, {"id": run_id, "state": "requested", "phase": "queued"})
            if show:
                show_progress(_progress_line(run, started))
            if run.get("state") in FINISHED:
                break
            await changed.wait()
        tg.cancel_scope.cancel()
    if show:
        end_progress()
    return run


async def gc_status(args) -> int:
    metadata = await load_metadata(args)
    run = _latest(metadata)
    if args.json:
        print(json.dumps({"leader": metadata.gc_leader(), "latest": run}, indent=2))
    elif run is None:
        print(f"no gc run yet; leader: {metadata.gc_leader() or 'none'}")
    else:
        print(f"leader: {metadata.gc_leader() or 'none'}\n" + _describe(run))
    return 0


async def retention_set(args) -> int:
    rules = read_rules_file(args.file, policy_rules.parse, (policy_rules.PolicyError,))
    if rules is None:
        return 2
    async with etcd_client(args) as client:
        metadata = ClusterMetadata(client, args.cluster, node_id="cli")
        await metadata.set_policies(rules)
    report(args, {"retention": len(rules.retention), "immutable": len(rules.immutable)},
           f"stored {len(rules.retention)} retention and {len(rules.immutable)} immutable-tag rules; "
           "`cargohold gc run --dry-run --wait` shows what retention would delete")
    return 0


async def retention_list(args) -> int:
    metadata = await load_metadata(args)
    rules = metadata.policies()
    print_rules(args, rules, [rule.describe() for rule in (*rules.retention, *rules.immutable)] or ["no rules"])
    return 0
