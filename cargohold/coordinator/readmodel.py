"""The node's local read model: an in-memory projection of the cluster's etcd state.

It is built from one consistent snapshot at start-up and then changed only by watch events,
in revision order, so it always equals etcd at `revision`. Nothing here does I/O; the
coordinator feeds it key-values and events (h11 style: protocol logic free of I/O).
"""

from __future__ import annotations

import bisect
import json
import sys

import anyio

from cargohold.coordinator.keys import Keys
from cargohold.coordinator.policies import Policies, ReplicationRules
from cargohold.coordinator.records import BlobRecord, ManifestRecord, Member, Snapshot
from cargohold.repositories.definitions import RemoteRepository, decode_definition
from cargohold.repositories.virtual import VirtualRepository, decode_virtual, is_virtual_record
from cargohold.runtime.memory import without_cycle_collection


class RepoState:
    __slots__ = ("registered", "tags", "manifests", "revisions", "_sorted_tags")

    def __init__(self) -> None:
        self.registered = False
        self.tags: dict[str, str] = {}
        self.manifests: dict[str, ManifestRecord] = {}
        self.revisions: dict[str, int] = {}        # manifest digest -> its record's mod revision
        self._sorted_tags: list[str] | None = None

    def sorted_tags(self) -> list[str]:
        if self._sorted_tags is None:
            self._sorted_tags = sorted(self.tags)
        return self._sorted_tags

    def tags_changed(self) -> None:
        self._sorted_tags = None


class BlobState:
    __slots__ = ("record", "revision", "nodes", "repos")

    def __init__(self) -> None:
        self.record: BlobRecord | None = None
        self.revision = 0                          # the record's mod revision
        self.nodes: set[str] = set()
        self.repos: set[str] = set()

    def empty(self) -> bool:
        return self.record is None and not self.nodes and not self.repos


def page(sorted_names: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """One page of a lexically sorted list after `last`; returns (names, more)."""
    start = bisect.bisect_right(sorted_names, last) if last else 0
    if n is None:
        return sorted_names[start:], False
    chunk = sorted_names[start:start + n]
    return chunk, start + n < len(sorted_names)


class ReadModel:
    def __init__(self, keys: Keys):
        self.keys = keys
        self.revision = 0
        self.repos: dict[str, RepoState] = {}
        self.blobs: dict[str, BlobState] = {}
        self.members: dict[str, Member] = {}
        self.alive: set[str] = set()
        # (repo, subject digest) -> manifests in that repo whose subject it is
        self.referrers: dict[tuple[str, str], set[str]] = {}
        self._sorted_repos: list[str] | None = None
        self._waiters: list[tuple[int, anyio.Event]] = []
        self.tombstones: dict[str, str] = {}          # digest -> run id
        self.gc_runs: dict[str, dict] = {}
        self.gc_leader: str | None = None
        self.policies = Policies()
        self.replication_rules = ReplicationRules()
        self.node_status: dict[str, dict] = {}
        self.definitions: dict[str, RemoteRepository] = {}   # repos/<name> of kind remote
        self.virtuals: dict[str, VirtualRepository] = {}      # repos/<name> of kind virtual
        # What changed since the last take_changes(): replication and GC react to these.
        self.changed_blobs: set[str] = set()
        self.changed_sections: set[str] = set()       # "members", "gc", "policies"

    def take_changes(self) -> tuple[set[str], set[str]]:
        changes = (self.changed_blobs, self.changed_sections)
        self.changed_blobs, self.changed_sections = set(), set()
        return changes

    # ---- queries
    def repo(self, name: str) -> RepoState | None:
        return self.repos.get(name)

    def sorted_repos(self) -> list[str]:
        if self._sorted_repos is None:
            self._sorted_repos = sorted(name for name, state in self.repos.items() if state.registered)
        return self._sorted_repos

    def blob_in_repo(self, digest: str, repo: str) -> BlobState | None:
        state = self.blobs.get(digest)
        if state is None or state.record is None or repo not in state.repos:
            return None
        return state

    # ---- changes
    def _note(self, kind: str, parsed) -> None:
        if kind.startswith("blob") or kind == "tombstone":
            self.changed_blobs.add(parsed.digest)
        elif kind in ("member", "alive"):
            self.changed_sections.add("members")
        elif kind in ("gc_run", "gc_leader"):
            self.changed_sections.add("gc")
        elif kind in ("policies", "replication_rules"):
            self.changed_sections.add("policies")
        elif kind == "repo":
            self.changed_sections.add("repositories")

    def apply_put(self, key: str, value: bytes, mod_revision: int = 0) -> None:
        parsed = self.keys.parse(key)
        kind = parsed.kind
        self._note(kind, parsed)
        if kind == "tag":
            repo = self._repo(parsed.repo)
            digest = sys.intern(value.decode())
            if parsed.name not in repo.tags:
                repo.tags_changed()
            repo.tags[parsed.name] = digest
        elif kind == "manifest":
            repo = self._repo(parsed.repo)
            record = ManifestRecord.decode(value)
            digest = sys.intern(parsed.digest)
            self._forget_referrer(parsed.repo, digest, repo.manifests.get(digest))
            repo.manifests[digest] = record
            repo.revisions[digest] = mod_revision
            if record.subject:
                self.referrers.setdefault((parsed.repo, record.subject), set()).add(digest)
        elif kind == "blob":
            state = self._blob(parsed.digest)
            state.record = BlobRecord.decode(value)
            state.revision = mod_revision
        elif kind == "blob_at":
            self._blob(parsed.digest).nodes.add(sys.intern(parsed.name))
        elif kind == "blob_in":
            self._blob(parsed.digest).repos.add(sys.intern(parsed.repo))
        elif kind == "repo":
            if not self._apply_definition(parsed.repo, value):
                self._register(parsed.repo)
        elif kind == "tombstone":
            self.tombstones[sys.intern(parsed.digest)] = value.decode()
        elif kind == "gc_run":
            self.gc_runs[parsed.name] = json.loads(value)
        elif kind == "gc_leader":
            self.gc_leader = value.decode()
        elif kind == "policies":
            self.policies = Policies.decode(value)
        elif kind == "replication_rules":
            self.replication_rules = ReplicationRules.decode(value)
        elif kind == "node_status":
            self.node_status[parsed.name] = json.loads(value)
        elif kind == "member":
            self.members[parsed.name] = Member.decode(parsed.name, value)
        elif kind == "alive":
            self.alive.add(parsed.name)

    def _apply_definition(self, name: str, value: bytes) -> bool:
        """Take `repos/<name>` as a remote or virtual definition; False for a local registration.
        A virtual record that does not decode is still a definition (it serves nothing)."""
        self._forget_definition(name)       # a definition may change kind (remove, then add)
        remote = decode_definition(name, value)
        if remote is not None:
            self.definitions[name] = remote
            return True
        if is_virtual_record(value):
            virtual = decode_virtual(name, value)
            if virtual is not None:
                self.virtuals[name] = virtual
            return True
        return False

    def _forget_definition(self, name: str) -> bool:
        remote = self.definitions.pop(name, None)
        virtual = self.virtuals.pop(name, None)
        return remote is not None or virtual is not None

    def _register(self, name: str) -> None:
        repo = self._repo(name)
        if not repo.registered:
            repo.registered = True
            self._sorted_repos = None

    def apply_delete(self, key: str) -> None:
        parsed = self.keys.parse(key)
        kind = parsed.kind
        self._note(kind, parsed)
        if kind == "tag":
            repo = self.repos.get(parsed.repo)
            if repo is not None and repo.tags.pop(parsed.name, None) is not None:
                repo.tags_changed()
        elif kind == "manifest":
            repo = self.repos.get(parsed.repo)
            if repo is not None:
                self._forget_referrer(parsed.repo, parsed.digest, repo.manifests.pop(parsed.digest, None))
                repo.revisions.pop(parsed.digest, None)
        elif kind in ("blob", "blob_at", "blob_in"):
            state = self.blobs.get(parsed.digest)
            if state is None:
                return
            if kind == "blob":
                state.record = None
            elif kind == "blob_at":
                state.nodes.discard(parsed.name)
            else:
                state.repos.discard(parsed.repo)
            if state.empty():
                del self.blobs[parsed.digest]
        elif kind == "repo":
            if self._forget_definition(parsed.repo):
                return
            repo = self.repos.get(parsed.repo)
            if repo is not None and repo.registered:
                repo.registered = False
                self._sorted_repos = None
        elif kind == "tombstone":
            self.tombstones.pop(parsed.digest, None)
        elif kind == "gc_run":
            self.gc_runs.pop(parsed.name, None)
        elif kind == "gc_leader":
            self.gc_leader = None
        elif kind == "policies":
            self.policies = Policies()
        elif kind == "replication_rules":
            self.replication_rules = ReplicationRules()
        elif kind == "node_status":
            self.node_status.pop(parsed.name, None)
        elif kind == "member":
            self.members.pop(parsed.name, None)
        elif kind == "alive":
            self.alive.discard(parsed.name)

    def gc_snapshot(self) -> Snapshot:
        """Manifests, tags and blob records as of `revision`, for the GC's mark. Built without
        yielding, so no watch batch lands halfway through."""
        with without_cycle_collection():
            return self._gc_snapshot()

    def _gc_snapshot(self) -> Snapshot:
        snapshot = Snapshot(self.revision)
        for name, repo in self.repos.items():
            revisions = repo.revisions
            snapshot.manifests.update({(name, digest): (record, revisions.get(digest, 0))
                                       for digest, record in repo.manifests.items()})
            snapshot.tags.update({(name, tag): digest for tag, digest in repo.tags.items()})
        snapshot.blobs = {digest: (state.record, state.revision)
                          for digest, state in self.blobs.items() if state.record is not None}
        return snapshot

    def advance(self, revision: int) -> None:
        """All events up to `revision` are applied: wake those waiting for it."""
        if revision <= self.revision:
            return
        self.revision = revision
        if self._waiters:
            still_waiting = []
            for wanted, event in self._waiters:
                if wanted <= revision:
                    event.set()
                else:
                    still_waiting.append((wanted, event))
            self._waiters = still_waiting

    async def wait_for(self, revision: int, timeout: float) -> bool:
        """Wait until the model has caught up with `revision` (read-your-writes). False on timeout."""
        if self.revision >= revision:
            return True
        event = anyio.Event()
        self._waiters.append((revision, event))
        with anyio.move_on_after(timeout):
            await event.wait()
        return self.revision >= revision

    def adopt_waiters(self, previous: "ReadModel") -> None:
        """Take over the writers waiting on a model this one replaces (after a reload)."""
        self._waiters = previous._waiters
        previous._waiters = []

    # ---- helpers
    def _repo(self, name: str) -> RepoState:
        state = self.repos.get(name)
        if state is None:
            state = self.repos[sys.intern(name)] = RepoState()
        return state

    def _blob(self, digest: str) -> BlobState:
        state = self.blobs.get(digest)
        if state is None:
            state = self.blobs[sys.intern(digest)] = BlobState()
        return state

    def _forget_referrer(self, repo: str, digest: str, old: ManifestRecord | None) -> None:
        if old is None or not old.subject:
            return
        referrers = self.referrers.get((repo, old.subject))
        if referrers is not None:
            referrers.discard(digest)
            if not referrers:
                del self.referrers[(repo, old.subject)]
