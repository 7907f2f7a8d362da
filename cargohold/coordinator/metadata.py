"""Registry metadata in etcd: the one interface the node uses for shared state.

Writes are single etcd transactions. Reads are answered from the local read model, which
watch events keep current; when the model misses, a linearizable etcd read confirms before
anything is reported unknown, so an acknowledged write is never answered 404 by any node.
After its own write a node waits (briefly) until its model has seen that revision, so a
client reads its own writes from the same node without a second etcd round trip.

While etcd is down (see `EtcdHealth`) the read model answers what it knows, and anything
that needs etcd, a write or a miss's confirming read, fails at once with EtcdUnavailable
(the API's 503 with Retry-After) rather than waiting. `staleness()` says for how long the
model may have missed changes.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from contextlib import contextmanager
from types import MappingProxyType
from typing import Awaitable, Callable, Iterator, Mapping, Sequence

import anyio

from cargohold.coordinator.etcd import (
    Compare, Delete, EtcdClient, EtcdCompacted, EtcdError, EtcdUnavailable, Get, KeyValue, LeaseLost, Put,
    TxnResult,
)
from cargohold.coordinator.barrier import ReadBarrier
from cargohold.coordinator.groupcommit import GroupCommit
from cargohold.coordinator.holds import HoldRefresher
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.policies import ReplicationRules
from cargohold.coordinator.readmodel import ReadModel, page
from cargohold.coordinator.records import BlobRecord, ManifestRecord, Member, Snapshot, encode_repo
from cargohold.repositories.definitions import (
    InvalidDefinition, RemoteRepository, decode_definition, is_remote_record)
from cargohold.repositories.virtual import VirtualRepository, check_virtual, decode_virtual, is_virtual_record

Definition = RemoteRepository | VirtualRepository

log = logging.getLogger("cargohold.coordinator")

SNAPSHOT_PAGE = 2000
# How long a writer waits for its own write to come back through the watch. Past it the
# write is still durable; later reads fall back to etcd.
VISIBILITY_TIMEOUT = 2.0
TXN_RETRIES = 5
# Between attempts to get a membership lease while etcd is away.
LEASE_RETRY_INTERVAL = 1.0
_NO_ANSWER = object()          # a list etcd could not give: the read model's is served


class MissingReferences(Exception):
    """A manifest references blobs or manifests that the repository does not have."""

    def __init__(self, blobs: list[str], manifests: list[str]):
        super().__init__(f"unknown blobs {blobs}, unknown manifests {manifests}")
        self.blobs = blobs
        self.manifests = manifests


class ConcurrentChange(Exception):
    """A transaction kept losing to concurrent writers."""


class DefinitionConflict(Exception):
    """A repository definition that clashes with what exists (the message says what)."""


class TagImmutable(Exception):
    """An immutable-tag rule forbids overwriting or deleting this tag."""

    def __init__(self, repo: str, tag: str, rule: str):
        super().__init__(f"tag {repo}:{tag} is protected by the {rule}")
        self.repo, self.tag, self.rule = repo, tag, rule


class TagProtected(Exception):
    """The caller may not remove this tag, which a delete by digest would take with it."""

    def __init__(self, repo: str, tag: str):
        super().__init__(f"tag {tag!r} of {repo} is protected")
        self.repo, self.tag = repo, tag


class Referenced(Exception):
    """A blob or manifest is part of a manifest of the same repository: removing it would break that image."""

    def __init__(self, repo: str, digest: str, by: str):
        what = "is the manifest" if by == digest else f"is referenced by manifest {by}"
        super().__init__(f"{digest} {what} in {repo}; delete that manifest first")
        self.repo, self.digest, self.by = repo, digest, by


MEMBER_STATES = ("active", "draining", "left")


# listener(changed blob digests, changed sections among "members", "gc", "policies")
ChangeListener = Callable[[set, set], None]
ALL_SECTIONS = frozenset({"members", "gc", "policies"})


class ChangeSignal:
    """Wakes a task when a watch batch brings a change it cares about.

    Subscribe it (or use `ClusterMetadata.changes`); `wait()` returns at the next accepted
    change, including one that came since the previous `wait()`, so nothing slips between
    looking at the read model and waiting.
    """

    def __init__(self, accept: Callable[[set, set], bool] = lambda blobs, sections: True):
        self._accept = accept
        self._event = anyio.Event()

    def __call__(self, blobs: set, sections: set) -> None:
        if self._accept(blobs, sections):
            self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Until the next accepted change, or `timeout` seconds; True if a change came."""
        with anyio.move_on_after(float("inf") if timeout is None else timeout):
            await self._event.wait()
        fired = self._event.is_set()
        if fired:
            self._event = anyio.Event()
        return fired


OWN_COPIES_KEPT = 4096     # unseen own copy records remembered before the seen ones are pruned


class ClusterMetadata:
    def __init__(self, client: EtcdClient, cluster: str, node_id: str, replicas_per_site: int = 2, *,
                 consistent_tag_reads: bool = True):
        self.client = client
        self.replicas_per_site = replicas_per_site
        self.keys = Keys(cluster)
        self.node_id = node_id
        self.model = ReadModel(self.keys)
        self.loaded = False
        self.snapshot_loads = 0       # full reads of the cluster's state (start-up, compaction)
        self.following = False        # a watch feeds the read model (run() is going)
        self.txn_count = 0
        # Copy records, releases and tombstone clears come in bursts (a join, a GC run): they
        # share transactions (see groupcommit.py).
        self.group = GroupCommit(client)
        self._own_copies: dict[str, int] = {}    # digest -> revision of this node's copy record
        self._listeners: list[ChangeListener] = []
        self._ready = False
        self._ready_checked_at = float("-inf")
        self.lease: int | None = None
        self.lease_granted = anyio.Event()
        self.grace = 3600.0           # the GC grace period; holds are refreshed at half of it
        self.holds = HoldRefresher(self.touch)   # pulls refresh holds through it, in the background
        self.read_barrier = ReadBarrier(client.current_revision)   # by-tag reads see every acknowledged write
        self.consistent_tag_reads = consistent_tag_reads   # False: tags from the read model as it is (faster, may lag)

    def subscribe(self, listener: ChangeListener) -> None:
        """Call `listener(changed_blob_digests, changed_sections)` after each applied watch batch.

        Listeners must not block: they note the work and wake their own task.
        """
        self._listeners.append(listener)

    def unsubscribe(self, listener: ChangeListener) -> None:
        self._listeners.remove(listener)

    @contextmanager
    def changes(self, accept: Callable[[set, set], bool] = lambda blobs, sections: True) -> Iterator[ChangeSignal]:
        """A ChangeSignal subscribed for the duration of the block."""
        signal = ChangeSignal(accept)
        self.subscribe(signal)
        try:
            yield signal
        finally:
            self.unsubscribe(signal)

    def _publish_changes(self) -> None:
        blobs, sections = self.model.take_changes()
        if blobs or sections:
            for listener in list(self._listeners):
                listener(blobs, sections)

    # ------------------------------------------------------------------ lifecycle
    async def is_current(self, timeout: float = 2.0) -> bool:
        """etcd takes a write and the watch brings it back into the read model within `timeout`.

        The probe key is under this cluster's prefix, so other clusters sharing the etcd (whose
        writes advance etcd's global revision but never reach our watch) cannot make us unready.
        Answers are reused for a second so that a probe storm is not a write storm.
        """
        now = time.monotonic()
        if now - self._ready_checked_at < 1.0:
            return self._ready
        ready = False
        if self.loaded:
            try:
                ready = await self.catch_up(timeout)
            except (TimeoutError, EtcdError):
                ready = False
        self._ready, self._ready_checked_at = ready, time.monotonic()
        return ready

    async def catch_up(self, timeout: float) -> bool:
        """Wait until the read model is at least as new as etcd is now: a write made now (to
        this node's probe key, under the cluster's prefix) has come back through the watch."""
        with anyio.fail_after(timeout):
            revision = await self.client.put(self.keys.probe(self.node_id), str(time.time()).encode())
        return await self.model.wait_for(revision, timeout)

    async def load(self) -> int:
        """Load one snapshot without following the watch (for commands that only read)."""
        return await self._load_snapshot()

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Load a snapshot, report started, then follow the watch until cancelled."""
        revision = await self._load_snapshot()
        self.following = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.holds.run)
            tg.start_soon(self.read_barrier.run)
            task_status.started()
            while True:
                try:
                    # Resumes from revision + 1 across etcd outages: a restarted etcd that kept
                    # its data costs no reload.
                    await self._follow(revision + 1)
                except EtcdCompacted as exc:
                    log.warning("watch revision %d compacted (at %d): reloading snapshot",
                                revision + 1, exc.revision)
                    revision = await self._load_snapshot()

    async def _load_snapshot(self) -> int:
        # Read everything at one revision, then watch from the next: nothing missed, nothing twice.
        revision = await self.client.current_revision()
        model = ReadModel(self.keys)
        async for kvs in self.client.iter_prefix(self.keys.prefix, revision=revision, page_size=SNAPSHOT_PAGE):
            for kv in kvs:
                model.apply_put(kv.key, kv.value, kv.mod_revision)
        model.adopt_waiters(self.model)
        self.model = model
        # The snapshot's objects live as long as the model: out of the cycle collector's
        # sight, a full collection no longer walks them all (0.1-0.2 s with 600,000 keys).
        gc.freeze()
        model.advance(revision)
        self.loaded = True
        self.snapshot_loads += 1
        model.take_changes()
        for listener in self._listeners:
            listener(set(model.blobs), set(ALL_SECTIONS))   # a reload may have changed anything
        log.info("read model loaded at revision %d: %d repositories, %d blobs",
                 revision, len(model.repos), len(model.blobs))
        return revision

    async def _follow(self, start_revision: int) -> None:
        async with self.client.watch_prefix(self.keys.prefix, start_revision=start_revision) as watch:
            async for batch in watch:
                model = self.model
                for event in batch.events:
                    if event.type == "put":
                        model.apply_put(event.key, event.value, event.mod_revision)
                    else:
                        model.apply_delete(event.key)
                model.advance(batch.revision)
                self._publish_changes()

    async def register(self, member: Member) -> Member:
        """Publish this node's member record. A node that was draining goes on draining, and one
        that has left stays out until `cargohold node join` admits it again. Returns once the
        record is in this node's read model, so that its first placement pass counts it."""
        existing = await self._get(self.keys.member(member.node_id))
        if existing is not None:
            state = Member.decode(member.node_id, existing.value).state
            member = member.with_state(state)
        revision = await self.client.put(self.keys.member(member.node_id), member.encode())
        await self.model.wait_for(revision, timeout=10.0)
        return member

    async def keep_membership(self, member: Member, ttl: int = 10) -> None:
        """Keep a lease-bound `alive` key for this node; renew until cancelled.

        The lease is also what a GC leader's key is bound to (`self.lease`): when this node
        dies or loses its lease, its leadership ends with it.
        """
        while True:
            try:
                lease = await self.client.grant_lease(ttl)
                await self.client.put(self.keys.alive(member.node_id), b"1", lease=lease)
            except EtcdUnavailable as exc:     # an etcd outage: the node goes on serving pulls
                log.debug("no membership lease yet: %s", exc)
                await anyio.sleep(LEASE_RETRY_INTERVAL)
                continue
            self.lease = lease
            self.lease_granted.set()
            try:
                await self.client.keep_alive(lease, ttl)
            except LeaseLost:
                log.warning("membership lease lost; registering again")
            finally:
                self.lease = None
                self.lease_granted = anyio.Event()
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    try:
                        await self.client.revoke_lease(lease)
                    except Exception:  # noqa: BLE001 - best effort on the way out
                        pass

    # ------------------------------------------------------------------ membership
    def members(self) -> dict[str, Member]:
        return dict(self.model.members)   # decoded once, when the watch delivered them

    def alive(self) -> set[str]:
        return set(self.model.alive)

    async def set_member_state(self, node_id: str, state: str, template: Member | None = None) -> Member:
        """Change a member's state (join: active, leave: draining, then left). Creates the record
        for a node that has not started yet when a template is given."""
        if state not in MEMBER_STATES:
            raise ValueError(f"unknown member state {state!r}")
        key = self.keys.member(node_id)
        for _ in range(TXN_RETRIES):
            kv = await self._get(key)
            if kv is None:
                if template is None:
                    raise KeyError(node_id)
                member = template.with_state(state)
                compare = [Compare.missing(key)]
            else:
                member = Member.decode(node_id, kv.value).with_state(state)
                compare = [Compare.mod_revision_equals(key, kv.mod_revision)]
            if (await self._txn(compare, [Put(key, member.encode())])).succeeded:
                return member
        raise ConcurrentChange(f"member {node_id} kept changing")

    # ------------------------------------------------------------------ copies
    async def record_copy(self, digest: str) -> bool:
        """This node now holds a verified copy: publish it, unless the blob is gone meanwhile."""
        result = await self._grouped([Compare.exists(self.keys.blob(digest))],
                                     [Put(self.keys.blob_at(digest, self.node_id), b"")])
        if result.succeeded:
            if len(self._own_copies) >= OWN_COPIES_KEPT:
                self._own_copies = {d: r for d, r in self._own_copies.items() if r > self.model.revision}
            self._own_copies[digest] = result.revision
        return result.succeeded

    def publishes_copy(self, digest: str) -> bool:
        """Whether this node's copy record of `digest` stands: in the read model, or written by
        this node at a revision the model has not reached yet. (Copy records are not read back;
        without this, a reconcile woken before the watch brings ours back writes it again.)"""
        if self.node_id in self.holders(digest):
            self._own_copies.pop(digest, None)
            return True
        revision = self._own_copies.get(digest)
        if revision is None:
            return False
        if self.model.revision >= revision:     # seen, and withdrawn since
            del self._own_copies[digest]
            return False
        return True

    async def drop_copy(self, digest: str, owners: list[str]) -> bool:
        """Withdraw this node's copy, only while every owner still publishes one."""
        return await self.withdraw_copy(digest, self.node_id, owners)

    async def withdraw_copy(self, digest: str, node_id: str, owners: list[str]) -> bool:
        """Withdraw `node_id`'s copy record, only while every owner still publishes one."""
        result = await self._grouped([Compare.exists(self.keys.blob_at(digest, owner)) for owner in owners],
                                     [Delete(self.keys.blob_at(digest, node_id))])
        return result.succeeded

    async def forget_copy(self, digest: str) -> None:
        """The local copy is missing or corrupt: stop advertising it."""
        await self._txn([], [Delete(self.keys.blob_at(digest, self.node_id))])

    async def release_tombstoned_copy(self, digest: str, run_id: str) -> bool:
        """The GC condemned this blob: withdraw our copy record while the tombstone still stands
        (a re-upload lifts it, and then our copy must stay)."""
        result = await self._grouped([Compare.value_equals(self.keys.tombstone(digest), run_id.encode())],
                                     [Delete(self.keys.blob_at(digest, self.node_id))])
        return result.succeeded

    async def clear_tombstone(self, digest: str, run_id: str) -> bool:
        """Remove a tombstone once no node publishes a copy (and nothing re-created the blob)."""
        return (await self._grouped(*self._tombstone_clearing(digest, run_id))).succeeded

    def _tombstone_clearing(self, digest: str, run_id: str) -> tuple[list, list]:
        return ([Compare.value_equals(self.keys.tombstone(digest), run_id.encode()),
                 Compare.none_with_prefix(self.keys.blob(digest) + "/")],
                [Delete(self.keys.tombstone(digest))])

    def holders(self, digest: str) -> set[str]:
        state = self.model.blobs.get(digest)
        return set(state.nodes) if state is not None else set()

    # ------------------------------------------------------------------ helpers
    async def _txn(self, compare, success, failure=None, *, visible: bool = True):
        """One transaction; with `visible`, return once our read model has applied it."""
        result = await self.client.txn(compare, success, failure or [])
        self.txn_count += 1
        # Only a followed model can show the write; a one-shot reader (the CLI) need not wait.
        if result.succeeded and visible and self.following:
            await self.model.wait_for(result.revision, VISIBILITY_TIMEOUT)
        return result

    async def _grouped(self, compare, success) -> TxnResult:
        """A guarded write that may share its transaction with concurrent ones; the caller does
        not need to read it back (no wait for the watch)."""
        self.txn_count += 1
        return await self.group.submit(compare, success)

    async def _get(self, key: str) -> KeyValue | None:
        return await self.client.get(key)

    def _repo_registration(self, repo: str) -> list:
        state = self.model.repo(repo)
        if state is not None and state.registered:
            return []
        return [Put(self.keys.repo(repo), encode_repo())]

    # ------------------------------------------------------------------ reads
    async def resolve_tag(self, repo: str, tag: str) -> str | None:
        """The tag's digest as etcd had it when this call began, so a tag moved through another
        node a moment ago is seen moved: the read model once it has applied the revision a
        shared round trip reports (or etcd itself if the model cannot catch up in time). While
        etcd does not answer, the model as it is. A miss is confirmed in etcd."""
        current = await self._model_is_current()
        state = self.model.repo(repo)
        if current and state is not None:
            digest = state.tags.get(tag)
            if digest is not None:
                return digest
        kv = await self._get(self.keys.tag(repo, tag))
        return kv.value.decode() if kv else None

    async def _model_is_current(self) -> bool:
        """Whether the read model has everything etcd had when this call began. Also True while
        etcd does not answer (the outage rule: serve what the model knows) and for a model no
        watch feeds; False only when etcd answered and the model did not catch up in time."""
        if not self.consistent_tag_reads or not self.following or not self.etcd_reachable():
            return True
        revision = await self.read_barrier.revision()
        return revision is None or await self.model.wait_for(revision, VISIBILITY_TIMEOUT)

    async def manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        state = self.model.repo(repo)
        if state is not None:
            record = state.manifests.get(digest)
            if record is not None:
                return record
        kv = await self._get(self.keys.manifest(repo, digest))
        return ManifestRecord.decode(kv.value) if kv else None

    async def blob_in_repo(self, repo: str, digest: str) -> BlobRecord | None:
        state = self.model.blob_in_repo(digest, repo)
        if state is not None:
            return state.record
        kvs, _, _ = await self.client.get_prefix(self.keys.blob(digest) + "/in/" + repo, limit=1)
        if not any(kv.key == self.keys.blob_in(digest, repo) for kv in kvs):
            return None
        kv = await self._get(self.keys.blob(digest))
        return BlobRecord.decode(kv.value) if kv else None

    async def repo_exists(self, repo: str) -> bool:
        state = self.model.repo(repo)
        if state is not None and state.registered:
            return True
        return await self._get(self.keys.repo(repo)) is not None

    async def tags(self, repo: str, n: int | None, last: str | None) -> tuple[list[str], bool] | None:
        """A page of the repository's tags in lexical order, or None if the repository is unknown.

        Read from etcd, not the read model: a list has no "miss" to confirm, and a model that
        lags behind another node's acknowledged push would leave its tag out (issue 13). While
        etcd does not answer, the model's (possibly older) list is served instead.
        """
        names = await self._listed_by_etcd(lambda: self._tags_in_etcd(repo))
        if names is _NO_ANSWER:
            state = self.model.repo(repo)
            if state is None or not state.registered:
                raise EtcdUnavailable(f"tags of {repo}: etcd did not answer and the read model does not know it")
            names = state.sorted_tags()
        if names is None:
            return None
        return page(names, n, last)

    async def _listed_by_etcd(self, read: Callable[[], Awaitable]):
        """What `read()` (a list read from etcd) returns, or _NO_ANSWER while etcd does not
        answer this node: then the read model's list is served at once (a pull does not wait
        for an etcd that is away), as every other read does during an outage."""
        if not self.etcd_reachable():
            return _NO_ANSWER
        try:
            return await read()
        except EtcdUnavailable:
            return _NO_ANSWER

    async def _tags_in_etcd(self, repo: str) -> list[str] | None:
        names = []
        prefix = self.keys.tags_prefix(repo)
        async for kvs in self.client.iter_prefix(prefix, keys_only=True):
            names.extend(kv.key[len(prefix):] for kv in kvs if "/" not in kv.key[len(prefix):])
        if not names and not await self.repo_exists(repo):
            return None
        return sorted(names)

    def catalog(self, n: int | None, last: str | None,
                visible: Callable[[str], bool] | None = None) -> tuple[list[str], bool]:
        """A page of repository names; `visible` (access control) filters them before paging."""
        names = self.model.sorted_repos()
        if visible is not None:
            names = [name for name in names if visible(name)]
        return page(names, n, last)

    async def referrers(self, repo: str, subject: str) -> list[tuple[str, ManifestRecord]]:
        """The manifests of `repo` whose subject is `subject`, sorted by digest.

        Which manifests reference `subject` is read from etcd (its reverse references, keys
        only), because a read model that lags would leave out a referrer another node just
        acknowledged (issue 13); records come from the model when it has them. While etcd does
        not answer, the model's own list is served.
        """
        digests = await self._listed_by_etcd(lambda: self._referencing_manifests(repo, subject))
        if digests is _NO_ANSWER:
            digests = self.model.referrers.get((repo, subject), ())
        found = []
        for digest in sorted(digests):
            record = await self.manifest(repo, digest)
            if record is not None and record.subject == subject:
                found.append((digest, record))
        return found

    async def _referencing_manifests(self, repo: str, subject: str) -> set[str]:
        """Manifests of `repo` with any reference to `subject` (as subject, or as index child)."""
        prefix = self.keys.ref(subject, repo, "")
        kvs, _, _ = await self.client.get_prefix(prefix, keys_only=True)
        return {kv.key[len(prefix):] for kv in kvs}

    # ------------------------------------------------------------------ writes
    async def record_blob(self, repo: str, digest: str, size: int) -> None:
        """A verified, fsynced blob now exists on this node and belongs to `repo`. One transaction.

        It (re)writes the blob record, which also refreshes the GC hold and changes the record's
        revision, so a sweep decided before this upload fails its re-check; and it lifts a
        tombstone if the GC had condemned the same content (the bytes are new and verified).
        """
        keys = self.keys
        now = time.time()
        await self._txn([], [Put(keys.blob(digest), BlobRecord(size, now, now).encode()),
                             Put(keys.blob_at(digest, self.node_id), b""), Put(keys.blob_in(digest, repo), b""),
                             Delete(keys.tombstone(digest)), *self._repo_registration(repo)])

    async def link_blob(self, repo: str, from_repo: str, digest: str) -> BlobRecord | None:
        """Cross-repository mount: link a blob of `from_repo` into `repo`. None if it is not there."""
        record = await self.blob_in_repo(from_repo, digest)
        if record is None:
            return None
        keys = self.keys
        touched = BlobRecord(record.size, record.created, time.time())
        result = await self._txn([Compare.exists(keys.blob_in(digest, from_repo))],
                                 [Put(keys.blob(digest), touched.encode()), Put(keys.blob_in(digest, repo), b""),
                                  *self._repo_registration(repo)])
        return record if result.succeeded else None

    def hold_is_cold(self, record: BlobRecord) -> bool:
        """Older than half the grace period: a pull should refresh it (a younger hold is
        younger than any sweep's cutoff)."""
        return time.time() - record.held_since >= self.grace / 2

    async def touch(self, digest: str, record: BlobRecord) -> bool:
        """A HEAD or GET saw this blob: refresh its GC hold, at most once per half grace period.

        docker skips the upload of a layer that HEAD answers 200 for and pushes the manifest
        next; the refreshed record makes any sweep decided before this HEAD fail its re-check.
        Returns False when the blob turns out to be gone (swept since our read model saw it).
        Pulls call it through `refresh_hold` / `refresh_hold_later`, never on their own path.
        """
        if not self.hold_is_cold(record):
            return True
        now = time.time()
        key = self.keys.blob(digest)
        result = await self._txn([Compare.exists(key)], [Put(key, BlobRecord(record.size, record.created, now).encode())])
        return result.succeeded

    def refresh_hold_later(self, digest: str, record: BlobRecord) -> None:
        """A GET served this blob: refresh a cold hold in the background, best effort."""
        if self.hold_is_cold(record):
            self.holds.request(digest, record)

    async def refresh_hold(self, digest: str, record: BlobRecord, timeout: float) -> bool | None:
        """A HEAD saw this blob: refresh a cold hold, waiting at most `timeout` seconds.

        True: the hold is fresh; False: the blob is gone (swept since the read model saw it);
        None: not known in time (etcd slow or away; the refresh goes on in the background).
        """
        if not self.hold_is_cold(record):
            return True
        pending = self.holds.request(digest, record)
        if pending is None or not self.etcd_reachable():    # no waiting for an etcd that failed
            return None
        with anyio.move_on_after(timeout):
            await pending.done.wait()
        return pending.outcome

    async def unlink_blob(self, repo: str, digest: str) -> bool:
        """Unlink a blob from a repository; False if it is not linked there.

        Refused (Referenced) while a manifest of the repository references it or is it: a user
        with `delete` could otherwise break a protected or immutable tag's image sideways. The
        guard is in the transaction, so a manifest PUT racing this (it needs the link we would
        delete, we need its reverse reference absent) either wins and the unlink is refused,
        or loses with MANIFEST_BLOB_UNKNOWN.
        """
        keys = self.keys
        link = keys.blob_in(digest, repo)
        for _ in range(TXN_RETRIES):
            result = await self._txn([Compare.exists(link), Compare.missing(keys.manifest(repo, digest)),
                                      Compare.none_with_prefix(keys.refs_from_repo_prefix(digest, repo))],
                                     [Delete(link)], [Get(link)])
            if result.succeeded:
                return True
            if not result.responses[0]:
                return False
            user = await self._manifest_using(repo, digest)
            if user is not None:
                raise Referenced(repo, digest, user)
            # the referencing manifest went away between the two reads: try again
        raise ConcurrentChange(f"blob {digest} in {repo} kept changing while being unlinked")

    async def _manifest_using(self, repo: str, digest: str) -> str | None:
        """A manifest of `repo` that is `digest` or references it (one, for the error message)."""
        keys = self.keys
        if await self._get(keys.manifest(repo, digest)) is not None:
            return digest
        prefix = keys.refs_from_repo_prefix(digest, repo)
        kvs, _, _ = await self.client.get_prefix(prefix, limit=1, keys_only=True)
        return kvs[0].key[len(prefix):] if kvs else None

    async def put_manifest(self, repo: str, digest: str, record: ManifestRecord, tag: str | None,
                           more_tags: Sequence[str] = ()) -> None:
        """Record a manifest (its bytes are already stored locally) and optionally tag it (with
        `tag` and `more_tags`, the `tag` parameters of a push by digest): one txn.

        Fails with MissingReferences unless every referenced blob is linked into the repository
        and every child manifest exists in it.
        """
        keys = self.keys
        checked = [keys.blob_in(b, repo) for b in record.blobs] + [keys.manifest(repo, c) for c in record.children]
        success = self._manifest_writes(repo, digest, record)
        compare = [Compare.exists(k) for k in checked]
        failure = [Get(k) for k in checked]
        guarded = []        # the immutable tags among them, in the order of their guards
        for name in dict.fromkeys(([tag] if tag is not None else []) + list(more_tags)):
            success.append(Put(keys.tag(repo, name), digest.encode()))
            guard = await self._immutable_guard(repo, name, digest)
            if guard is not None:
                compare.append(guard)
                failure.append(Get(keys.tag(repo, name)))
                guarded.append(name)
        result = await self._txn(compare, success, failure)
        if result.succeeded:
            return
        for name, current in zip(guarded, result.responses[len(checked):]):
            if current and current[0].value.decode() != digest:
                raise TagImmutable(repo, name, self.model.policies.immutable_rule(repo, name).describe())
        present = [bool(r) for r in result.responses[:len(checked)]]
        n_blobs = len(record.blobs)
        raise MissingReferences(
            [b for b, ok in zip(record.blobs, present[:n_blobs]) if not ok],
            [c for c, ok in zip(record.children, present[n_blobs:]) if not ok],
        )

    def _manifest_writes(self, repo: str, digest: str, record: ManifestRecord) -> list:
        """The writes of a manifest record: its record, its bytes as this node's blob copy, its
        reverse references (which keep what it references from the GC), the repository."""
        keys = self.keys
        return [
            Put(keys.manifest(repo, digest), record.encode()),
            Put(keys.blob(digest), BlobRecord(record.size, record.created).encode()),
            Put(keys.blob_at(digest, self.node_id), b""),
            Put(keys.blob_in(digest, repo), b""),
            *(Put(keys.ref(child, repo, digest), b"") for child in dict.fromkeys(record.references())),
            *self._repo_registration(repo),
            Delete(keys.tombstone(digest)),
        ]

    async def put_cached_manifest(self, repo: str, digest: str, record: ManifestRecord, tag: str | None) -> None:
        """Record a manifest fetched from an upstream into its cache repository (the bytes are
        already stored locally), and optionally tag it: one txn. Unlike `put_manifest`, its
        blobs and child manifests need not be in the cluster yet (they are fetched on demand);
        its reverse references are written all the same, so the GC keeps whatever arrives."""
        success = self._manifest_writes(repo, digest, record)
        if tag is not None:
            success.append(Put(self.keys.tag(repo, tag), digest.encode()))
        await self._txn([], success)

    async def _immutable_guard(self, repo: str, tag: str, digest: str) -> Compare | None:
        """For a tag under an immutable rule: the txn guard that it is new or already `digest`."""
        rule = self.model.policies.immutable_rule(repo, tag)
        if rule is None:
            return None
        current = await self.resolve_tag(repo, tag)
        if current is None:
            return Compare.missing(self.keys.tag(repo, tag))
        if current == digest:
            return Compare.value_equals(self.keys.tag(repo, tag), digest.encode())
        raise TagImmutable(repo, tag, rule.describe())

    def _refuse_immutable(self, repo: str, tag_keys: list[str]) -> None:
        for key in tag_keys:
            tag = key.rpartition("/")[2]
            rule = self.model.policies.immutable_rule(repo, tag)
            if rule is not None:
                raise TagImmutable(repo, tag, rule.describe())

    async def delete_manifest(self, repo: str, digest: str,
                              may_remove_tag: Callable[[str], bool] | None = None) -> bool:
        """Delete a manifest, its reverse references and every tag that points at it.

        Everything the decision rests on is read at one revision: the manifest, the tags
        pointing at it, the references to it from the same repository. The transaction then
        requires that none of that changed since (the repository's whole tag range, not only
        the tags seen: a tag pushed through another node after the read must not be deleted
        unjudged), and a retry reads again, so the checks always judge exactly what the
        transaction deletes: TagImmutable, TagProtected (`may_remove_tag`, the caller's tag
        protection, asked about every tag on every attempt) and Referenced (an index of the
        repository lists it).
        """
        keys = self.keys
        for _ in range(TXN_RETRIES):
            revision = await self.client.current_revision()
            kv = await self.client.get(keys.manifest(repo, digest), revision=revision)
            if kv is None:
                return False
            tag_keys = await self._tags_pointing_at(repo, digest, revision)
            self._refuse_immutable(repo, tag_keys)
            self._refuse_protected(repo, tag_keys, may_remove_tag)
            await self._refuse_if_part_of_another(repo, digest, revision)
            record = ManifestRecord.decode(kv.value)
            compare = [Compare.mod_revision_equals(kv.key, kv.mod_revision),
                       Compare.unchanged_since(keys.tags_prefix(repo), revision),
                       Compare.unchanged_since(keys.refs_from_repo_prefix(digest, repo), revision)]
            success = [Delete(kv.key), Delete(keys.blob_in(digest, repo)),
                       *(Delete(keys.ref(child, repo, digest)) for child in dict.fromkeys(record.references())),
                       *(Delete(k) for k in tag_keys)]
            if (await self._txn(compare, success)).succeeded:
                return True
        raise ConcurrentChange(f"manifest {repo}@{digest} kept changing while being deleted")

    async def _tags_pointing_at(self, repo: str, digest: str, revision: int) -> list[str]:
        prefix = self.keys.tags_prefix(repo)
        found = []
        async for kvs in self.client.iter_prefix(prefix, revision=revision):
            found.extend(kv.key for kv in kvs
                         if "/" not in kv.key[len(prefix):] and kv.value.decode() == digest)
        return found

    @staticmethod
    def _refuse_protected(repo: str, tag_keys: list[str], may_remove_tag: Callable[[str], bool] | None) -> None:
        for key in tag_keys if may_remove_tag is not None else ():
            tag = key.rpartition("/")[2]
            if not may_remove_tag(tag):
                raise TagProtected(repo, tag)

    async def _refuse_if_part_of_another(self, repo: str, digest: str, revision: int) -> None:
        """Referenced if a manifest of `repo` lists `digest` as a child (or a blob). Being a
        referrer's subject does not count: the spec lets referrers outlive their subject."""
        prefix = self.keys.refs_from_repo_prefix(digest, repo)
        async for kvs in self.client.iter_prefix(prefix, revision=revision, keys_only=True):
            for kv in kvs:
                user = kv.key[len(prefix):]
                record = await self.manifest(repo, user)   # content-addressed: the model's copy will do
                if record is not None and (digest in record.children or digest in record.blobs):
                    raise Referenced(repo, digest, user)

    async def delete_tag(self, repo: str, tag: str, expected_digest: str | None = None) -> str | None:
        """Delete a tag (only while it still points at `expected_digest`, when given). Returns the
        digest it pointed at (read in the same transaction, for the audit log), or None if there
        was no such tag."""
        key = self.keys.tag(repo, tag)
        self._refuse_immutable(repo, [key])
        guard = Compare.value_equals(key, expected_digest.encode()) if expected_digest else Compare.exists(key)
        result = await self._txn([guard], [Get(key), Delete(key)])
        return result.responses[0][0].value.decode() if result.succeeded else None

    async def publish_status(self, status: dict) -> None:
        """This node's replication figures, bound to its lease so a dead node's vanish."""
        lease = self.lease
        if lease is not None:
            await self.client.put(self.keys.node_status(self.node_id), json.dumps(status).encode(), lease=lease)

    def manifest_dependencies(self, digest: str) -> tuple[str, ...] | None:
        """If `digest` is a manifest in any repository: the blobs and manifests it references."""
        state = self.model.blobs.get(digest)
        for repo in (state.repos if state is not None else ()):
            repo_state = self.model.repo(repo)
            record = repo_state.manifests.get(digest) if repo_state is not None else None
            if record is not None:
                return record.blobs + record.children
        return None

    async def set_replication_rules(self, rules) -> None:
        await self._txn([], [Put(self.keys.replication_rules(), rules.encode())])

    # ------------------------------------------------------------------ read-model views
    # What other packages may read of the read model. Each call looks at the current model
    # (a compaction reload replaces it), and mappings are read-only views, not copies.
    def revision(self) -> int:
        """The etcd revision the read model has applied."""
        return self.model.revision

    def etcd_reachable(self) -> bool:
        """No etcd request or stream of this node has failed since etcd last answered."""
        return self.client.health.reachable

    def check_writable(self) -> None:
        """Raise EtcdUnavailable at once while etcd counts as down: for the start of work that
        can only end in a write (an upload), so that a client learns before sending the bytes."""
        if self.client.health.down:
            raise EtcdUnavailable(f"etcd has not answered for {self.staleness():.1f} s")

    def staleness(self) -> float:
        """For how many seconds the read model may have missed changes: the time since etcd
        last answered this node, while it does not answer; 0 while it does (the watch then
        brings every change within milliseconds)."""
        return self.client.health.unreachable_for()

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Wait (at most `timeout` s) until the read model has applied `revision`."""
        return await self.model.wait_for(revision, timeout)

    def blob_states(self) -> Mapping:
        """digest -> BlobState (record, nodes holding a copy, repositories linking it)."""
        return MappingProxyType(self.model.blobs)

    def tombstones(self) -> Mapping[str, str]:
        """digest -> id of the GC run that condemned it."""
        return MappingProxyType(self.model.tombstones)

    def gc_runs(self) -> Mapping[str, dict]:
        return MappingProxyType(self.model.gc_runs)

    def gc_leader(self) -> str | None:
        return self.model.gc_leader

    def gc_snapshot(self) -> Snapshot:
        """Manifests, tags and blobs as the read model has them now (the GC's mark input)."""
        return self.model.gc_snapshot()

    def replication_rules(self) -> ReplicationRules:
        return self.model.replication_rules

    def node_status(self) -> Mapping[str, dict]:
        """node id -> the replication figures that node last published."""
        return MappingProxyType(self.model.node_status)

    def cached_tags_of(self, repo: str, digest: str) -> list[str]:
        """The repository's tags that point at `digest`, as the read model has them (no etcd read)."""
        state = self.model.repo(repo)
        return [tag for tag, target in state.tags.items() if target == digest] if state is not None else []

    # ------------------------------------------------------------------ policies
    def policies(self):
        return self.model.policies

    async def set_policies(self, policies) -> None:
        await self._txn([], [Put(self.keys.policies(), policies.encode())])

    async def request_gc_run(self, run: dict) -> None:
        """Queue a GC run (the leader picks it up through its watch)."""
        await self._txn([], [Put(self.keys.gc_run(run["id"]), json.dumps(run).encode())])

    # ------------------------------------------------------------------ repository definitions
    def repository_definitions(self) -> Mapping[str, RemoteRepository]:
        """name -> definition of every remote repository, as the read model has them."""
        return MappingProxyType(self.model.definitions)

    def virtual_definitions(self) -> Mapping[str, VirtualRepository]:
        """name -> definition of every virtual repository, as the read model has them."""
        return MappingProxyType(self.model.virtuals)

    async def stored_definitions(self) -> dict[str, Definition]:
        """The definitions of both kinds as etcd has them now (for the CLI, which follows no watch)."""
        definitions, _ = await self._stored_repos()
        return definitions

    async def _stored_repos(self) -> tuple[dict[str, Definition], dict[str, int]]:
        """(name -> decodable definition, name -> mod revision of every `repos/<name>` key)."""
        kvs, _, _ = await self.client.get_prefix(self.keys.repos_prefix())
        definitions: dict[str, Definition] = {}
        revisions: dict[str, int] = {}
        for kv in kvs:
            name = kv.key[len(self.keys.repos_prefix()):]
            revisions[name] = kv.mod_revision
            definition = decode_definition(name, kv.value) or decode_virtual(name, kv.value)
            if definition is not None:
                definitions[name] = definition
        return definitions, revisions

    async def define_repository(self, definition: RemoteRepository, *, replace: bool = False) -> None:
        """Store a definition. A new one must not clash with a local namespace of that name or
        under it, nor nest in or around another definition; `replace` changes an existing one.
        At most one definition answers Docker's `registry-mirrors` requests (with two, neither
        would: `routing.route` could not choose). A virtual repository's deployment target never
        becomes a cache."""
        key = self.keys.repo(definition.name)
        current = await self._get(key)
        others = await self.stored_definitions()
        self._refuse_second_docker_mirror(definition, _remotes(others))
        self._refuse_deploying_into(definition.name, others)
        guard = await self._definition_guard(definition, current, others, replace=replace)
        result = await self._txn(guard, [Put(key, definition.encode())])
        if not result.succeeded:
            raise DefinitionConflict(f"{definition.name} changed meanwhile (or a local repository appeared "
                                     "under it); nothing was stored")

    async def define_virtual(self, definition: VirtualRepository, *, replace: bool = False) -> None:
        """Store a virtual repository, checked (`check_virtual`) against the stored definitions:
        a cycle, nesting too deep or a deployment target that cannot take pushes is refused with
        a message saying which. The members' records are guarded too, so two definitions stored
        at once cannot close a cycle between them."""
        key = self.keys.repo(definition.name)
        current = await self._get(key)
        others, revisions = await self._stored_repos()
        guard = await self._definition_guard(definition, current, others, replace=replace)
        virtuals = {name: d for name, d in _virtuals(others).items() if name != definition.name}
        try:
            check_virtual(definition, virtuals, _remotes(others))
        except InvalidDefinition as exc:
            raise DefinitionConflict(str(exc)) from None
        guard += [Compare(self.keys.repo(m.name), "mod", "==", revisions[m.name]) if m.name in revisions
                  else Compare.missing(self.keys.repo(m.name)) for m in definition.members]
        result = await self._txn(guard, [Put(key, definition.encode())])
        if not result.succeeded:
            raise DefinitionConflict(f"{definition.name} or one of its members changed meanwhile (or a local "
                                     "repository appeared under it); nothing was stored")

    async def _definition_guard(self, definition: Definition, current: KeyValue | None,
                                others: Mapping[str, Definition], *, replace: bool) -> list:
        """The txn guard for storing `definition`: with `replace`, the existing record of its kind
        unchanged since read; else a new name (`_new_definition_guard`)."""
        if not replace:
            return await self._new_definition_guard(definition.name, current, others)
        of_its_kind = is_virtual_record if isinstance(definition, VirtualRepository) else is_remote_record
        if current is None or not of_its_kind(current.value):
            raise DefinitionConflict(f"no {definition.kind} repository {definition.name} to change")
        return [Compare(self.keys.repo(definition.name), "mod", "==", current.mod_revision)]

    async def _new_definition_guard(self, name: str, current: KeyValue | None,
                                    others: Mapping[str, Definition]) -> list:
        """Refuse a new definition whose name is taken (a definition, a local repository of that
        name or under it, a definition nesting with it); the txn guard that keeps it so."""
        if name in others:
            raise DefinitionConflict(f"{others[name].kind} repository {name} exists (change it with --replace)")
        if current is not None:
            raise DefinitionConflict(f"{name} is a local repository with content")
        for other, definition in others.items():
            if other.startswith(name + "/") or name.startswith(other + "/"):
                raise DefinitionConflict(f"{name} would nest with {definition.kind} repository {other}")
        await self._refuse_local_repositories_under(name)
        key = self.keys.repo(name)
        return [Compare.missing(key), Compare.none_with_prefix(key + "/")]

    @staticmethod
    def _refuse_second_docker_mirror(definition: RemoteRepository, others: Mapping[str, RemoteRepository]) -> None:
        if definition.docker_mirror:
            for name, other in others.items():
                if other.docker_mirror and name != definition.name:
                    raise DefinitionConflict(f"remote repository {name} already answers Docker's registry-mirrors "
                                             "requests (--docker-mirror); only one may")

    @staticmethod
    def _refuse_deploying_into(name: str, others: Mapping[str, Definition]) -> None:
        for virtual in _virtuals(others).values():
            if virtual.deploy_to == name:
                raise DefinitionConflict(f"{name} is the deployment target of virtual repository {virtual.name}: "
                                         "a remote repository cannot take pushes")

    async def _refuse_local_repositories_under(self, name: str) -> None:
        kvs, _, _ = await self.client.get_prefix(self.keys.repo(name) + "/", limit=1, keys_only=True)
        if kvs:
            inside = kvs[0].key[len(self.keys.repos_prefix()):]
            raise DefinitionConflict(f"{name} holds local repositories (e.g. {inside}): choose another name")

    async def remove_definition(self, name: str) -> bool:
        """Delete a remote or virtual repository's definition (also one that no longer decodes);
        False if there was none. A virtual repository naming it as a member afterwards reads a
        local namespace of that name."""
        key = self.keys.repo(name)
        current = await self._get(key)
        if current is None or not (is_remote_record(current.value) or is_virtual_record(current.value)):
            return False
        result = await self._txn([Compare(key, "mod", "==", current.mod_revision)], [Delete(key)])
        return result.succeeded

    # ------------------------------------------------------------------ replication reads
    # (added for the remote-content read path; kept together at the end of the class)
    async def holders_confirmed(self, digest: str) -> set[str]:
        """The nodes publishing a copy of `digest`: from the read model, or, when it knows of
        none (it may lag behind a write acknowledged by another node), from a linearizable
        etcd read of the blob's copy records."""
        held = self.holders(digest)
        if held:
            return held
        prefix = self.keys.blob(digest) + "/at/"
        kvs, _, _ = await self.client.get_prefix(prefix, keys_only=True)
        return {kv.key[len(prefix):] for kv in kvs}

    # ------------------------------------------------------------------ reads over several repositories
    # (virtual repositories: a candidate that does not have the content must cost no etcd call)
    async def tag_reader(self) -> Callable[[str, str], Awaitable[str | None]]:
        """Tag lookups in several repositories after one read barrier: the read model answers
        when it has caught up with etcd (a miss is a miss: no round trip per repository), as it
        does while etcd does not answer; etcd itself when the model could not catch up in time."""
        current = self.following and await self._model_is_current()

        async def lookup(repo: str, tag: str) -> str | None:
            if not current:         # the model lags: etcd's answer (no second barrier)
                kv = await self._get(self.keys.tag(repo, tag))
                return kv.value.decode() if kv else None
            state = self.model.repo(repo)
            return state.tags.get(tag) if state is not None else None
        return lookup

    def known_manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        """The manifest's record if the read model has it in `repo` (content by digest: never stale)."""
        state = self.model.repo(repo)
        return state.manifests.get(digest) if state is not None else None

    def known_blob(self, repo: str, digest: str) -> BlobRecord | None:
        """The blob's record if the read model has it linked into `repo`."""
        state = self.model.blob_in_repo(digest, repo)
        return state.record if state is not None else None


def _remotes(definitions: Mapping[str, Definition]) -> dict[str, RemoteRepository]:
    return {name: d for name, d in definitions.items() if isinstance(d, RemoteRepository)}


def _virtuals(definitions: Mapping[str, Definition]) -> dict[str, VirtualRepository]:
    return {name: d for name, d in definitions.items() if isinstance(d, VirtualRepository)}
