"""What the replicator should do about one blob, and from where: decisions free of I/O.

Everything here takes a picture of the cluster (`ClusterView`: members, who is alive, how long
the others have been dead, the replication rules) and the blob's state, and answers with a
`Decision`; the executor (`replicator.Replicator`) carries it out. Unit tests drive these
functions with hand-made pictures, no etcd and no peers.

The garbage collector's work on a condemned blob (releasing tombstoned copies) is not decided
here: a tombstoned blob is `IDLE` for the replicator, and `cargohold.gc.node_sweep` handles it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from cargohold.coordinator.policies import ReplicationRules
from cargohold.coordinator.records import Member
from cargohold.replication.placement import owners, preference

log = logging.getLogger("cargohold.replication")

# Small blobs that a node must fetch in bulk (a join, a repair) are read from one holder
# several per stream: per-blob stream set-up and loop round trips cost more than their bytes.
GROUP_BLOB_MAX = 8 * 1024 * 1024
GROUP_MAX_BLOBS = 64
GROUP_MAX_BYTES = 64 * 1024 * 1024
RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0


@dataclass(frozen=True)
class ClusterView:
    """The cluster as one node sees it at one moment: enough to place any blob."""
    node_id: str
    site: str
    replicas: int
    members: Mapping[str, Member]
    alive: frozenset[str]
    rules: ReplicationRules
    dead_since: Mapping[str, float] = field(default_factory=dict)   # node -> monotonic time
    now: float = 0.0
    down_after: float = 300.0

    def candidates(self, site: str | None = None) -> list[str]:
        """Active members of `site` (default: ours) that are alive, or dead for less than `down_after`."""
        site = site or self.site
        return [m.node_id for m in self.members.values()
                if m.site == site and m.state == "active"
                and self.now - self.dead_since.get(m.node_id, self.now) < self.down_after]

    def sites(self) -> set[str]:
        return {m.site for m in self.members.values() if m.state != "left"}

    def target_sites(self, repos: Iterable[str]) -> set[str]:
        """The sites whose replication rules call for a blob in these repositories."""
        return self.rules.sites_for(tuple(repos), self.sites())

    def owners(self, digest: str, site: str | None = None) -> list[str]:
        return owners(digest, self.candidates(site), self.replicas)

    def sources(self, digest: str, holders: Iterable[str]) -> list[Member]:
        """The live holders to read `digest` from (never this node), nearest first."""
        same_site = {m.node_id for m in self.members.values() if m.site == self.site}
        live = [n for n in holders if n in self.alive and n in self.members]
        ordered = preference(digest, live, me=self.node_id, same_site=same_site)
        return [self.members[n] for n in ordered if n != self.node_id and self.members[n].grpc]

    def sites_of(self, nodes: Iterable[str]) -> set[str]:
        return {self.members[n].site for n in nodes if n in self.members}


class Action(enum.Enum):
    IDLE = "idle"            # nothing for this node to do
    FETCH = "fetch"          # this node owns the blob and must copy it here
    WAIT = "wait"            # must fetch, but a manifest waits for what it references
    DROP = "drop"            # holds a copy it does not own, and every owner has one


@dataclass(frozen=True)
class Decision:
    action: Action
    size: int = 0                          # FETCH: the blob's size
    owners: tuple[str, ...] = ()           # DROP: the copies that must stand when ours goes
    waiting_on: tuple[str, ...] = ()       # WAIT: the references this site holds no copy of yet


IDLE = Decision(Action.IDLE)


@dataclass(frozen=True)
class BlobFacts:
    """What the metadata says of one blob, as `decide` needs it."""
    size: int | None                       # None: no blob record (gone, or not yet)
    holders: frozenset[str]
    repos: frozenset[str]
    condemned: bool = False                # tombstoned by a GC run
    publishes_copy: bool = False           # this node's copy record stands (or is on its way)
    dependencies: tuple[str, ...] = ()     # for a manifest: what it references


def decide(digest: str, blob: BlobFacts, view: ClusterView,
           facts_of: Callable[[str], BlobFacts | None] = lambda _d: None) -> Decision:
    """Fetch, wait, drop or nothing, for this node and one blob. `facts_of` looks up the
    blobs a manifest references (a manifest is fetched only once its site holds them)."""
    if blob.size is None or blob.condemned:
        return IDLE
    site_owners = {site: view.owners(digest, site) for site in view.target_sites(blob.repos)}
    me = view.node_id
    if me in site_owners.get(view.site, ()) and not blob.publishes_copy:
        waiting = missing_dependencies(blob.dependencies, view, facts_of)
        if waiting:
            return Decision(Action.WAIT, waiting_on=waiting)
        return Decision(Action.FETCH, size=blob.size)
    needed = tuple(owner for owners_in_site in site_owners.values() for owner in owners_in_site)
    if me in blob.holders and needed and me not in needed and set(needed) <= blob.holders:
        return Decision(Action.DROP, owners=needed)
    return IDLE


def missing_dependencies(dependencies: Iterable[str], view: ClusterView,
                         facts_of: Callable[[str], BlobFacts | None]) -> tuple[str, ...]:
    """The references that this site should hold and holds no copy of yet. One the cluster
    does not know is not waited for: a manifest cached from an upstream is recorded before its
    blobs and child manifests, which come on demand, maybe never (issue 14)."""
    missing = []
    for dependency in dependencies:
        facts = facts_of(dependency)
        if facts is None:
            continue
        if view.site in view.target_sites(facts.repos) and view.site not in view.sites_of(facts.holders):
            missing.append(dependency)
    return tuple(missing)


def retry_delay(attempts: int) -> float:
    """Back-off before a failed blob is tried again: doubling, capped."""
    return min(RETRY_DELAY * 2 ** attempts, MAX_RETRY_DELAY)


def groupable(size: int) -> bool:
    return 0 < size <= GROUP_BLOB_MAX


class FetchGroups:
    """Collects small blobs to fetch by the holder they would be read from; `add` returns a
    full group to send now, `rest` the groups left at the end of a batch."""

    def __init__(self, max_blobs: int = GROUP_MAX_BLOBS, max_bytes: int = GROUP_MAX_BYTES):
        self.max_blobs, self.max_bytes = max_blobs, max_bytes
        self._groups: dict[str, tuple[list[str], int]] = {}    # holder -> (digests, bytes)

    def add(self, source: str, digest: str, size: int) -> list[str] | None:
        group, group_bytes = self._groups.get(source, ([], 0))
        full = None
        if group and (len(group) == self.max_blobs or group_bytes + size > self.max_bytes):
            full, group, group_bytes = group, [], 0
        group.append(digest)
        self._groups[source] = (group, group_bytes + size)
        return full

    def rest(self) -> list[list[str]]:
        groups = [group for group, _ in self._groups.values()]
        self._groups.clear()
        return groups


class Liveness:
    """Remembers since when each member has not been alive (a member is 'down', and its blobs
    get new owners, once that lasts `down_after`). No I/O: `observe` is given the members, the
    alive set and the time, and returns the next moment a member becomes down."""

    def __init__(self, down_after: float):
        self.down_after = down_after
        self.dead_since: dict[str, float] = {}
        self._seen_alive: set[str] = set()
        self._repairing: set[str] = set()

    def observe(self, members: Mapping[str, Member], alive: set[str], now: float) -> float | None:
        for node_id, member in members.items():
            if node_id in alive:
                self._seen_alive.add(node_id)
                if self.dead_since.pop(node_id, None) is not None:
                    log.info("member %s is alive (%s)", node_id, member.state)
            elif node_id not in self.dead_since:
                self.dead_since[node_id] = now
                # A starting node writes its member record just before its alive key: only a
                # member we saw alive and then lost is news.
                if member.state != "left" and node_id in self._seen_alive:
                    log.warning("member %s is not alive: reads go to other holders; its blobs are "
                                "re-replicated if it stays down for %.0fs", node_id, self.down_after)
            elif now - self.dead_since[node_id] >= self.down_after and node_id not in self._repairing:
                self._repairing.add(node_id)
                if member.state == "active":
                    log.warning("member %s down for %.0fs: repair started, its blobs get new owners",
                                node_id, self.down_after)
        self._repairing &= set(self.dead_since)
        deadlines = [since + self.down_after for since in self.dead_since.values() if since + self.down_after > now]
        return min(deadlines) if deadlines else None
