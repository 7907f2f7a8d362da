"""Cluster operations behind `cargohold node ...`: membership changes and their progress."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import anyio

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata, Member


@dataclass
class NodeRow:
    id: str
    site: str
    state: str
    url: str
    alive: bool
    blobs: int
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LeaveProgress:
    node: str
    state: str
    alive: bool
    remaining: int          # blobs the node still holds a copy of
    total: int              # what it held when the leave began

    @property
    def done(self) -> bool:
        return self.state == "left"


async def snapshot(client: EtcdClient, cluster: str) -> ClusterMetadata:
    metadata = ClusterMetadata(client, cluster, node_id="cli")
    await metadata.load()
    return metadata


def _held(metadata: ClusterMetadata) -> dict[str, tuple[int, int]]:
    held: dict[str, list[int]] = {}
    for state in metadata.blob_states().values():
        if state.record is None:
            continue
        for node in state.nodes:
            entry = held.setdefault(node, [0, 0])
            entry[0] += 1
            entry[1] += state.record.size
    return {node: (c, b) for node, (c, b) in held.items()}


async def list_nodes(client: EtcdClient, cluster: str) -> list[NodeRow]:
    metadata = await snapshot(client, cluster)
    held = _held(metadata)
    alive = metadata.alive()
    return [NodeRow(m.node_id, m.site, m.state, m.url, m.node_id in alive, *held.get(m.node_id, (0, 0)))
            for m in sorted(metadata.members().values(), key=lambda m: (m.site, m.node_id))]


async def join(client: EtcdClient, cluster: str, node_id: str, site: str = "default") -> Member:
    metadata = ClusterMetadata(client, cluster, node_id="cli")
    template = Member(node_id, site, "", "", "active")
    return await metadata.set_member_state(node_id, "active", template=template)


@dataclass
class LeaveStarted:
    member: Member
    held: int               # blobs the node held a copy of when it was marked draining


async def leave(client: EtcdClient, cluster: str, node_id: str) -> LeaveStarted:
    """Mark the node draining, and count what it holds at that moment: a live node may finish
    its drain before anybody follows it, so the count cannot be taken later."""
    metadata = ClusterMetadata(client, cluster, node_id="cli")
    await metadata.load()
    held = sum(1 for s in metadata.blob_states().values() if node_id in s.nodes and s.record is not None)
    member = await metadata.set_member_state(node_id, "draining")
    return LeaveStarted(member, held)


async def follow_leave(client: EtcdClient, cluster: str, node_id: str, report: Callable[[LeaveProgress], None],
                       replicas: int = 2, held_at_start: int = 0) -> LeaveProgress:
    """Report progress each time the cluster changes, until the node has left; return the last.

    A live node drains itself: its peers fetch the blobs it owned, then it withdraws its
    copies and marks itself `left`. A node that is not alive cannot hand anything over:
    once every blob it held has its full set of copies on the remaining nodes (fetched
    from other holders), its copy records are withdrawn here and it is marked `left`.
    """
    metadata = ClusterMetadata(client, cluster, node_id="cli", replicas_per_site=replicas)
    with metadata.changes() as changed:
        return await _follow_leave(metadata, node_id, report, changed, held_at_start)


async def _follow_leave(metadata: ClusterMetadata, node_id: str, report, changed, held_at_start: int) -> LeaveProgress:
    async with anyio.create_task_group() as tg:
        await tg.start(metadata.run)
        total = held_at_start
        while True:
            member = metadata.members().get(node_id)
            if member is None:
                raise KeyError(node_id)
            remaining = sum(1 for s in metadata.blob_states().values() if node_id in s.nodes)
            total = max(total, remaining)
            alive = node_id in metadata.alive()
            progress = LeaveProgress(node_id, member.state, alive, remaining, total)
            report(progress)
            if progress.done:
                break
            if not alive:
                await _settle_dead_node(metadata, member)
            await changed.wait()
        tg.cancel_scope.cancel()
    return progress


async def _settle_dead_node(metadata: ClusterMetadata, member: Member) -> None:
    from cargohold.replication.placement import owners   # placement is replication's rule

    alive = metadata.alive()
    members = metadata.members()
    candidates = [m.node_id for m in members.values()
                  if m.site == member.site and m.state == "active" and m.node_id in alive]
    replicas = min(metadata.replicas_per_site, len(candidates))
    pending = 0
    for digest, state in list(metadata.blob_states().items()):
        if member.node_id not in state.nodes:
            continue
        blob_owners = owners(digest, candidates, replicas)
        if blob_owners and set(blob_owners) <= state.nodes:
            await metadata.withdraw_copy(digest, member.node_id, blob_owners)
        else:
            pending += 1
    if pending == 0:
        await metadata.set_member_state(member.node_id, "left")
