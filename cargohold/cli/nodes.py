"""`cargohold node list|join|leave`: what the operator sees (tables, progress, JSON)."""

from __future__ import annotations

import json
import sys

from cargohold.cli.options import (
    cluster_command, etcd_client, fail, print_table, progress_bar, report, show_progress,
)
from cargohold.replication import nodes as admin


def register(sub) -> None:
    """Add `node list|join|leave` to the top-level subparsers."""
    node = sub.add_parser("node", help="cluster members: list, join, leave")
    actions = node.add_subparsers(dest="action", required=True)
    cluster_command(actions.add_parser("list", help="members: id, site, state, URL, alive, blobs held, bytes"),
                    node_list)
    p = actions.add_parser("join", help="admit a new node, or re-activate one that left")
    p.add_argument("node_id")
    p.add_argument("--site", default="default", help="site of a node not seen before")
    cluster_command(p, node_join)
    p = actions.add_parser("leave", help="drain a node: its blobs are copied elsewhere, then it is removed")
    p.add_argument("node_id")
    p.add_argument("--wait", action="store_true", help="wait until the node has left, showing progress")
    p.add_argument("--replicas", type=int, default=2, help="the cluster's replicas_per_site (default 2)")
    cluster_command(p, node_leave)


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
    print_table([header] + [(r.id, r.site, r.state, "yes" if r.alive else "no", str(r.blobs), _human(r.bytes), r.url)
                            for r in rows])
    return 0


async def node_join(args) -> int:
    async with etcd_client(args) as client:
        member = await admin.join(client, args.cluster, args.node_id, args.site)
    report(args, {"node": member.node_id, "site": member.site, "state": member.state},
           f"node {member.node_id} is active in site {member.site}")
    return 0


async def node_leave(args) -> int:
    async with etcd_client(args) as client:
        try:
            started = await admin.leave(client, args.cluster, args.node_id)
        except KeyError:
            return fail(f"no node {args.node_id!r} in cluster {args.cluster!r}")
        member = started.member
        if not args.wait:
            report(args, {"node": member.node_id, "state": member.state, "holds": started.held},
                   f"node {member.node_id} is draining ({started.held} blobs to hand over); "
                   f"`cargohold node leave {member.node_id} --wait` follows it")
            return 0
        show = (lambda progress: None) if args.json else _show_progress
        last = await admin.follow_leave(client, args.cluster, args.node_id, show, replicas=args.replicas,
                                        held_at_start=started.held)
    if not args.json:
        sys.stderr.write("\n")
    report(args, {"node": last.node, "state": last.state, "moved": last.total},
           f"node {last.node} has left: its {last.total} blobs have their copies on other nodes")
    return 0


def _show_progress(progress: admin.LeaveProgress) -> None:
    done = progress.total - progress.remaining
    note = "" if progress.alive else "  (node not alive: copying from other holders)"
    show_progress(f"draining {progress.node} {progress_bar(done, progress.total)} {done}/{progress.total} blobs{note}")
