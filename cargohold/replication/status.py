"""The cluster's replication picture, derived from ClusterMetadata's read-model views (no I/O),
and the loop that publishes this node's own figures for it.

Per site and rule: how many blobs the rules send to that site still lack a copy there, and
the age of the oldest of them (the lag). Per site: what its nodes report doing (in flight,
failed with reasons, bytes/s), from the `status/<node>` records they publish.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import anyio

from cargohold.coordinator.metadata import ClusterMetadata

log = logging.getLogger("cargohold.replication")


@dataclass
class SiteRuleStatus:
    site: str
    rule: str
    blobs: int = 0              # blobs the rule sends to this site
    pending: int = 0            # of which the site holds no copy yet
    pending_bytes: int = 0
    lag_seconds: float = 0.0    # age of the oldest pending blob


@dataclass
class SiteStatus:
    site: str
    nodes: list[str] = field(default_factory=list)
    queued: int = 0
    in_flight: int = 0
    failed: int = 0
    rate: float = 0.0
    failures: list[dict] = field(default_factory=list)


def replication_status(metadata: ClusterMetadata, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    members = metadata.members()
    live_sites = {m.site for m in members.values() if m.state != "left"}
    rules = metadata.replication_rules()
    rows: dict[tuple[str, str], SiteRuleStatus] = {}
    for digest, state in metadata.blob_states().items():
        if state.record is None:
            continue
        repo_rules = {(r.describe() if (r := rules.rule_for(repo)) else "* -> * (default)") for repo in state.repos}
        targets = rules.sites_for(state.repos, live_sites)
        held_in = {members[n].site for n in state.nodes if n in members}
        for site in targets:
            for rule in repo_rules or {"* -> * (default)"}:
                row = rows.setdefault((site, rule), SiteRuleStatus(site, rule))
                row.blobs += 1
                if site not in held_in:
                    row.pending += 1
                    row.pending_bytes += state.record.size
                    row.lag_seconds = max(row.lag_seconds, now - state.record.created)
    sites: dict[str, SiteStatus] = {site: SiteStatus(site) for site in sorted(live_sites)}
    for node, status in metadata.node_status().items():
        site = sites.setdefault(status.get("site", "?"), SiteStatus(status.get("site", "?")))
        site.nodes.append(node)
        site.queued += status.get("queued", 0)
        site.in_flight += status.get("in_flight", 0)
        site.failed += status.get("failed", 0)
        site.rate += status.get("rate", 0.0)
        site.failures += [{"node": node, **f} for f in status.get("failures", [])]
    return {"rules": [asdict(r) for r in sorted(rows.values(), key=lambda r: (r.site, r.rule))],
            "sites": [asdict(s) for s in sites.values()]}



def held_count(metadata: ClusterMetadata, node_id: str) -> tuple[int, int]:
    """How many blobs `node_id` publishes a copy of, and their bytes."""
    count = size = 0
    for state in metadata.blob_states().values():
        if node_id in state.nodes and state.record is not None:
            count += 1
            size += state.record.size
    return count, size


async def publish_status(metadata: ClusterMetadata, report: Callable[[], dict], bytes_fetched: Callable[[], int],
                         interval: float = 2.0) -> None:
    """Report this node's figures (`report()`, plus the fetch rate) in etcd for `cargohold
    replication status`: a report when something changed or is going on, not a poll."""
    last_bytes, last_time, last = bytes_fetched(), time.monotonic(), None
    while True:
        await anyio.sleep(interval)
        now, fetched = time.monotonic(), bytes_fetched()
        status = {**report(), "rate": round((fetched - last_bytes) / max(now - last_time, 1e-6), 1)}
        last_bytes, last_time = fetched, now
        comparable = {k: v for k, v in status.items() if k != "time"}
        if comparable != last or status["queued"] or status["in_flight"]:
            try:
                await metadata.publish_status(status)
                last = comparable
            except Exception as exc:  # noqa: BLE001 - status is best effort
                log.debug("could not publish replication status: %s", exc)
