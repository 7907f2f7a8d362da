"""`cargohold node list|join|leave`: what the operator sees (tables, progress, JSON)."""

from __future__ import annotations

import json
import sys

from cargohold.cli.options import etcd_client
from cargohold.replication import nodes as admin


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


async def node_list(args) -> int:
    async with etcd_client(args) as client:
        rows = await admin.list_nodes(client, args.cluster)
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return 0
    header = ("ID", "SITE", "STATE", "ALIVE", "BLOBS", "BYTES", "URL")
    table = [header] + [(r.id, r.site, r.state, "yes" if r.alive else "no", str(r.blobs), _human(r.bytes), r.url)
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


async def node_join(args) -> int:
    async with etcd_client(args) as client:
        member = await admin.join(client, args.cluster, args.node_id, args.site)
    _report(args, {"node": member.node_id, "site": member.site, "state": member.state},
            f"node {member.node_id} is active in site {member.site}")
    return 0


async def node_leave(args) -> int:
    async with etcd_client(args) as client:
        try:
            member = await admin.leave(client, args.cluster, args.node_id)
        except KeyError:
            print(f"cargohold: no node {args.node_id!r} in cluster {args.cluster!r}", file=sys.stderr)
            return 1
        if not args.wait:
            _report(args, {"node": member.node_id, "state": member.state},
                    f"node {member.node_id} is draining; `cargohold node leave {member.node_id} --wait` follows it")
            return 0
        show = (lambda progress: None) if args.json else _show_progress
        last = await admin.follow_leave(client, args.cluster, args.node_id, show, replicas=args.replicas)
    if not args.json:
        sys.stderr.write("\n")
    _report(args, {"node": last.node, "state": last.state, "moved": last.total},
            f"node {last.node} has left: its {last.total} blobs have their copies on other nodes")
    return 0


def _show_progress(progress: admin.LeaveProgress) -> None:
    total = max(progress.total, 1)
    done = progress.total - progress.remaining
    width = 30
    filled = int(width * done / total)
    note = "" if progress.alive else "  (node not alive: copying from other holders)"
    line = f"draining {progress.node} [{'#' * filled}{'.' * (width - filled)}] {done}/{progress.total} blobs{note}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _report(args, document: dict, text: str) -> None:
    print(json.dumps(document) if args.json else text)
