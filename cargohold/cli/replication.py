"""`cargohold replication rules set|list` and `cargohold replication status`."""

from __future__ import annotations

import json

from cargohold.cli.options import etcd_client, load_metadata, read_rules_file
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.policies import PolicyError, parse_replication
from cargohold.replication.status import replication_status


async def rules_set(args) -> int:
    rules = read_rules_file(args.file, parse_replication, (PolicyError,))
    if rules is None:
        return 2
    async with etcd_client(args) as client:
        await ClusterMetadata(client, args.cluster, node_id="cli").set_replication_rules(rules)
    print(json.dumps({"rules": len(rules.rules)}) if args.json else
          f"stored {len(rules.rules)} replication rules; repositories no rule matches go to every site")
    return 0


async def rules_list(args) -> int:
    metadata = await load_metadata(args)
    rules = metadata.replication_rules()
    if args.json:
        print(rules.encode().decode())
    else:
        for rule in rules.rules:
            print(rule.describe())
        print("* -> every site (default)")
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
