"""`cargohold replication rules set|list` and `cargohold replication status`."""

from __future__ import annotations

import json

from cargohold.cli.options import (
    cluster_command, etcd_client, load_metadata, print_rules, read_rules_file, report,
)
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.policies import PolicyError, parse_replication
from cargohold.replication.status import replication_status


def register(sub) -> None:
    """Add `replication rules set|list` and `replication status` to the top-level subparsers."""
    replication = sub.add_parser("replication", help="which repositories reach which sites, and progress")
    actions = replication.add_subparsers(dest="what", required=True)
    rules = actions.add_parser("rules", help="replication rules").add_subparsers(dest="action", required=True)
    p = rules.add_parser("set", help="store the rules file (YAML or JSON: replication: [{repositories, sites}])")
    p.add_argument("file")
    cluster_command(p, rules_set)
    cluster_command(rules.add_parser("list", help="show the stored rules"), rules_list)
    cluster_command(actions.add_parser("status", help="per site and rule: pending, lag, in flight, failures, bytes/s"),
                    status)


async def rules_set(args) -> int:
    rules = read_rules_file(args.file, parse_replication, (PolicyError,))
    if rules is None:
        return 2
    async with etcd_client(args) as client:
        await ClusterMetadata(client, args.cluster, node_id="cli").set_replication_rules(rules)
    report(args, {"rules": len(rules.rules)},
           f"stored {len(rules.rules)} replication rules; repositories no rule matches go to every site")
    return 0


async def rules_list(args) -> int:
    metadata = await load_metadata(args)
    rules = metadata.replication_rules()
    print_rules(args, rules, [rule.describe() for rule in rules.rules] + ["* -> every site (default)"])
    return 0


async def status(args) -> int:
    metadata = await load_metadata(args)
    report = replication_status(metadata)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'SITE':<12} {'RULE':<28} {'BLOBS':>7} {'PENDING':>8} {'LAG':>8}")
    for row in report["rules"]:
        print(f"{row['site']:<12} {row['rule']:<28} {row['blobs']:>7} {row['pending']:>8} {row['lag_seconds']:>7.1f}s")
    print()
    print(f"{'SITE':<12} {'NODES':<20} {'QUEUED':>7} {'IN FLIGHT':>9} {'FAILED':>7} {'BYTES/S':>12}")
    for site in report["sites"]:
        print(f"{site['site']:<12} {','.join(sorted(site['nodes'])):<20} {site['queued']:>7} {site['in_flight']:>9} "
              f"{site['failed']:>7} {site['rate']:>12.0f}")
        for failure in site["failures"][:10]:
            print(f"    {failure['node']}: {failure['digest'][:19]}… {failure['attempts']} attempts: {failure['reason']}")
    return 0
