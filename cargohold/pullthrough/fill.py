"""Blob fills: a blob the cluster lacks is fetched from the upstream once for the whole
cluster, streamed to the clients that want it while it is written, and published as an
ordinary cluster blob only once its digest is verified.

Per node, all requests for one digest share one `_Fill`, run as a task of the filler's own
task group, never of a request: a client that disconnects does not abort it. That task claims
the fill in etcd (`coordinator.fills`). The winner streams the upstream's response into a
`staging.GrowingFile` that this node's readers follow as it grows. Another node's clients
meanwhile stream from the filling node (`RemoteContent.follow_fill`, gRPC `FollowFill`, served
here by `tail_from_thread`), while that node's task waits for the claim to go, then links the
published blob (or, if the filler died, claims the fill itself; a client that was following
the dead node gets a body that ends short, and its retry joins the new fill).
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

import anyio
import anyio.from_thread
import anyio.lowlevel

from cargohold.blobs.remote import FollowedFill, RemoteContent
from cargohold.blobs.store import BlobStore
from cargohold.coordinator.fills import FillClaim, claim_fill, release_fill, wait_for_release
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.oci.reference import Digest
from cargohold.pullthrough.staging import FillTail, GrowingFile, batches
from cargohold.repositories.routing import Route
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.errors import (
    DigestMismatch, UpstreamDenied, UpstreamError, UpstreamNotFound, UpstreamRateLimited, UpstreamUnavailable,
    outcome_label,
)

if TYPE_CHECKING:
    from cargohold.pullthrough.figures import CacheFigures

log = logging.getLogger("cargohold.pullthrough")

# How long a node waits for another node's fill of a blob before answering "unavailable". The
# filler's upstream reads are bounded, so a fill that makes no progress fails well before this.
JOIN_TIMEOUT = 600.0
QUEUED_BATCHES = 4        # batches received from the upstream while the disk catches up
RELEASE_TIMEOUT = 5.0     # for removing a claim on the way out (the lease removes it anyway)

# The outcome a fill's claim records when it fails, and what its waiters then raise.
_FAILURES: dict[str, type[UpstreamError]] = {
    "not_found": UpstreamNotFound, "denied": UpstreamDenied, "unavailable": UpstreamUnavailable,
    "mismatch": DigestMismatch,
}


def error_for(claim: FillClaim) -> UpstreamError:
    """What a waiter raises for a fill that failed on another node."""
    reason = f"the fill on node {claim.node} failed: {claim.reason or claim.failed}"
    if claim.failed == "rate_limited":
        return UpstreamRateLimited(reason, None)
    return _FAILURES.get(claim.failed, UpstreamUnavailable)(reason)


def _with_queued(first: bytes, queue) -> list[bytes]:
    """`first` and the batches queued behind it, up to QUEUED_BATCHES: a step that fell behind
    catches up in one worker-thread trip instead of one per batch (each trip wakes a thread
    and then the event loop)."""
    group = [first]
    while len(group) < QUEUED_BATCHES:
        try:
            group.append(queue.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return group


def _sole(exc: BaseException) -> BaseException:
    """The one error inside task-group wrapping (an upstream that broke off, a full disk), so
    that clients and waiting nodes learn what happened rather than "a group of errors"."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class FilledBlob:
    """A blob being filled on this node, readable while it arrives."""

    def __init__(self, staged: GrowingFile, store: BlobStore):
        self._staged = staged
        self._store = store
        self.size: int = staged.size

    async def read(self, start: int, length: int) -> AsyncIterator[bytes]:
        """`length` bytes from `start`, as soon as the fill has them; raises the fill's error
        (the response must then end uncleanly). Once the fill is published, from the store."""
        if self._staged.following():
            async with aclosing(self._staged.follow(start, length)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if self._staged.error is not None:
            raise self._staged.error
        async with aclosing(self._store.read(self._staged.digest, start, length)) as chunks:
            async for chunk in chunks:
                yield chunk


class FollowedBlob(FilledBlob):
    """A blob being filled on another node, streamed from there while it arrives."""

    def __init__(self, followed: FollowedFill):
        self._followed = followed
        self.size = followed.size

    async def read(self, start: int, length: int) -> AsyncIterator[bytes]:
        """As FilledBlob.read; raises ContentUnavailable when the other node's fill fails or that
        node goes away (the response must then end uncleanly)."""
        async with aclosing(self._followed.read(start, length)) as chunks:
            async for chunk in chunks:
                yield chunk


@dataclass
class _Fill:
    """Everything this node's requests for one digest share."""

    digest: Digest
    repository: str                                        # the remote repository (figures)
    local_names: set[str] = field(default_factory=set)     # repositories to link the blob into
    staged: GrowingFile | None = None                      # set: clients stream it
    error: BaseException | None = None                     # set: clients raise it
    following: str | None = None                           # set: clients stream that node's fill
    settled: bool = False                                  # the blob is in the cluster, or failed
    changed: anyio.Event = field(default_factory=anyio.Event)   # set (and replaced) on every change
    received: int = 0                                      # bytes this node's fill got from upstream

    def stream(self, staged: GrowingFile) -> None:
        self.staged = staged
        self._changed()

    def follow(self, node: str | None) -> None:
        """While this node waits for `node`'s fill (None: no longer), clients stream from it."""
        self.following = node
        self._changed()

    def fail(self, error: BaseException) -> None:
        if self.staged is not None:
            self.staged.fail(error)
        elif not self.settled:
            self.error = error
        self._changed()

    def settle(self) -> None:
        self.settled = True
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def answered(self) -> bool:
        """Whether clients have their answer here: a stream, an error, or the published blob."""
        return self.settled or self.staged is not None or self.error is not None


class BlobFiller:
    """Fills for this node's requests. While another node fills a blob, this node's clients
    stream it from there through `remote`; without `remote` they wait for its publication."""

    def __init__(self, metadata: ClusterMetadata, store: BlobStore, remote: RemoteContent | None,
                 node_id: str, *, figures: "CacheFigures", audit: Callable[..., None],
                 join_timeout: float = JOIN_TIMEOUT, max_blob_size: int | None = None):
        self.metadata = metadata
        self.store = store
        self.remote = remote
        self.node_id = node_id
        self.figures = figures
        self.audit = audit
        self.join_timeout = join_timeout
        self.max_blob_size = max_blob_size      # as for uploads: a hostile upstream cannot fill the disk
        self._fills: dict[str, _Fill] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        self._loop: anyio.lowlevel.EventLoopToken | None = None     # for peers' threads (tail_from_thread)

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Background work (fills outlive the request that started them); runs in the node's task group."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._loop = anyio.lowlevel.current_token()
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tasks = self._loop = None

    async def open(self, upstream: UpstreamClient, route: Route, digest: Digest) -> FilledBlob | None:
        """None when the cluster already has the blob (it is then linked into route.local_name, and
        the caller serves it the ordinary way); else a FilledBlob streaming from the fill.
        Raises upstream errors (UpstreamNotFound, UpstreamUnavailable, ...) before any byte.

        Blobs are scoped to repositories: content the cluster holds for other names is linked
        into `route.local_name` only once the upstream confirms that its name has the blob (a
        HEAD), so nobody reads another repository's private layer by asking a cache for its digest."""
        if self._linked(route.local_name, str(digest)):
            return None
        fill = self._fills.get(str(digest))
        if self._held_elsewhere(str(digest)) or (fill is not None and route.local_name not in fill.local_names):
            await self._confirm(upstream, route, digest)
        if await self._link_known(route.local_name, str(digest)):
            return None
        fill = self._fills.get(str(digest))
        if fill is None:
            fill = self._start(upstream, route, digest)
        else:
            fill.local_names.add(route.local_name)
            self.figures.fill(route.repository.name, "joined")
        followed = await self._answer_or_follow(fill)
        if followed is not None:
            self.figures.fill(route.repository.name, "followed")
            return followed
        failed = fill.error or (fill.staged.error if fill.staged is not None else None)
        if failed is not None:
            raise failed
        if fill.staged is not None:
            return FilledBlob(fill.staged, self.store)
        # Published without streaming (another node filled it, or no size was announced): the
        # fill linked it into every repository its clients asked for.
        if not await self._link_known(route.local_name, str(digest)):
            raise UpstreamUnavailable(f"blob {digest}: filled, but removed from the cluster meanwhile")
        return None

    async def _answer_or_follow(self, fill: _Fill) -> FollowedBlob | None:
        """Until this node's fill has an answer for its clients; meanwhile, while another node
        fills the blob, a stream from that node (None when it has none to give: then wait)."""
        tried: str | None = None
        while not fill.answered():
            changed = fill.changed
            if fill.following is not None and fill.following != tried and self.remote is not None:
                tried = fill.following
                followed = await self.remote.follow_fill(tried, str(fill.digest))
                if followed is not None:
                    log.info("streaming %s from node %s's fill", fill.digest, tried)
                    return FollowedBlob(followed)
                continue
            await changed.wait()
        return None

    async def _confirm(self, upstream: UpstreamClient, route: Route, digest: Digest) -> None:
        """The upstream has `digest` under `route.upstream_name`, or UpstreamNotFound. While the
        upstream is unavailable, content this same remote repository cached under another name
        counts as confirmed (it came from that upstream); other content does not."""
        try:
            found = await upstream.has_blob(route.upstream_name, str(digest))
        except UpstreamUnavailable:
            state = self.metadata.blob_states().get(str(digest))
            prefix = route.repository.name + "/"
            if state is not None and any(repo.startswith(prefix) for repo in state.repos):
                return
            raise
        if not found:
            raise UpstreamNotFound(f"{route.upstream_name} has no blob {digest}")

    def _linked(self, local_name: str, digest: str) -> bool:
        state = self.metadata.blob_states().get(digest)
        return state is not None and local_name in state.repos

    def _held_elsewhere(self, digest: str) -> bool:
        state = self.metadata.blob_states().get(digest)
        return state is not None and bool(state.repos)

    def _start(self, upstream: UpstreamClient, route: Route, digest: Digest) -> _Fill:
        if self._tasks is None:
            raise RuntimeError("BlobFiller.run is not running")
        fill = self._fills[str(digest)] = _Fill(digest, route.repository.name, {route.local_name})
        self._tasks.start_soon(self._settle, fill, upstream, route)
        return fill

    async def _link_known(self, local_name: str, digest: str) -> bool:
        """Link the blob into `local_name` if the read model knows a repository that has it."""
        state = self.metadata.blob_states().get(digest)
        if state is None or not state.repos:
            return False
        if local_name in state.repos:
            return True
        return await self.metadata.link_blob(local_name, next(iter(state.repos)), digest) is not None

    # ------------------------------------------------------------------ the shared task
    async def _settle(self, fill: _Fill, upstream: UpstreamClient, route: Route) -> None:
        """Claim, wait for another node or fill: until the blob is in the cluster or failed."""
        try:
            await self._claim_until_settled(fill, upstream, route)
        except Exception as exc:     # noqa: BLE001 - handed to every client of the fill
            fill.fail(exc)
        finally:
            fill.settle()
            self._forget(fill)

    def _forget(self, fill: _Fill) -> None:
        """Later requests no longer join this fill (it is published, or it failed)."""
        if self._fills.get(str(fill.digest)) is fill:
            del self._fills[str(fill.digest)]

    async def _claim_until_settled(self, fill: _Fill, upstream: UpstreamClient, route: Route) -> None:
        digest = str(fill.digest)
        waited = confirmed = False
        deadline = anyio.current_time() + self.join_timeout
        while True:
            answer = await claim_fill(self.metadata, digest, route.local_name)
            if answer.won is not None:
                await self._fill(fill, upstream, route, answer.won)
                return
            # Content held or being filled for another repository is someone else's until our
            # upstream confirms that our name has it too (see open()): before it is linked, and
            # before our clients stream another node's fill of it.
            others = answer.linked_in if answer.linked_in is not None else answer.held.repo if answer.held else None
            if others is not None and others not in fill.local_names and not confirmed:
                await self._confirm(upstream, route, fill.digest)
                confirmed = True
            if answer.linked_in is not None and await self._link_all(fill, answer.linked_in):
                if waited:
                    self.figures.fill(fill.repository, "joined")
                return
            if answer.held is not None:
                log.info("blob %s is being filled by node %s: waiting (clients stream from it)",
                         digest, answer.held.node)
                waited = True
                fill.follow(answer.held.node)
                with anyio.move_on_after(deadline - anyio.current_time()) as waiting:
                    ended = await wait_for_release(self.metadata, digest, answer.revision)
                fill.follow(None)
                if waiting.cancelled_caught:
                    raise UpstreamUnavailable(f"blob {digest}: the fill on node {answer.held.node} did not "
                                              f"finish within {self.join_timeout:g}s")
                if ended is not None:
                    raise error_for(ended)

    async def _link_all(self, fill: _Fill, linked_in: str) -> bool:
        for name in sorted(fill.local_names - {linked_in}):
            if await self.metadata.link_blob(name, linked_in, str(fill.digest)) is None:
                return False     # unlinked meanwhile: claim again
        return True

    # ------------------------------------------------------------------ this node fills
    async def _fill(self, fill: _Fill, upstream: UpstreamClient, route: Route, claim: FillClaim) -> None:
        # outcome None: interrupted (the node stops); the claim then goes without a verdict, so
        # that a waiting node takes the fill over instead of failing with us.
        outcome, reason = None, None
        try:
            staged = await self._stage(fill, upstream, route)
            await self._publish(fill, staged, route)
            outcome = "filled"
        except Exception as exc:
            outcome, reason = outcome_label(exc), str(exc)
            log.warning("fill of %s from %s failed: %s", fill.digest, route.repository.url, reason)
            raise
        finally:
            self._count(route, fill, outcome or "interrupted")
            failed = outcome if outcome not in ("filled", None) else None
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT):
                await release_fill(self.metadata, str(fill.digest), claim, failed, reason)

    async def _stage(self, fill: _Fill, upstream: UpstreamClient, route: Route) -> GrowingFile:
        """The upstream's blob in a staging file, verified; clients stream it meanwhile. A failure
        reaches the clients and deletes the file."""
        async with upstream.stream_blob(route.upstream_name, str(fill.digest)) as chunks:
            self._refuse_oversize(fill.digest, chunks.size or 0)
            staged = await GrowingFile.create(self.store.staging_path(), fill.digest, chunks.size)
            try:
                if staged.size:          # (an empty or unsized blob is served once published)
                    fill.stream(staged)
                await self._receive(chunks, staged)
                await staged.verify()
                return staged
            except BaseException as exc:
                staged.fail(_sole(exc))
                with anyio.CancelScope(shield=True):
                    await staged.discard()
                raise _sole(exc) from None
            finally:
                fill.received = staged.received

    async def _receive(self, chunks: AsyncIterator[bytes], staged: GrowingFile) -> None:
        """Upstream chunks to this node's readers, into the staging file and into its hash:
        receiving, writing and hashing go on side by side, each batch in order."""
        to_disk, disk_queue = anyio.create_memory_object_stream[bytes](QUEUED_BATCHES)
        to_hasher, hash_queue = anyio.create_memory_object_stream[bytes](QUEUED_BATCHES)

        async def drain(queue, step) -> None:
            async with queue:
                async for batch in queue:
                    await step(_with_queued(batch, queue))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(drain, disk_queue, staged.append)
            tasks.start_soon(drain, hash_queue, staged.hash)
            async with to_disk, to_hasher:
                async for batch in batches(chunks):
                    self._refuse_oversize(staged.digest, staged.received + len(batch))
                    staged.receive(batch)          # this node's readers have it from here
                    await to_disk.send(batch)
                    await to_hasher.send(batch)

    def _refuse_oversize(self, digest: Digest, size: int) -> None:
        if self.max_blob_size is not None and size > self.max_blob_size:
            raise UpstreamError(f"blob {digest} is larger than this registry's max_blob_size "
                                f"({self.max_blob_size} bytes): not cached")

    async def _publish(self, fill: _Fill, staged: GrowingFile, route: Route) -> None:
        """Make the verified blob an ordinary cluster blob, as an upload's last PUT does."""
        digest = str(fill.digest)
        try:
            async with self.store.locked(fill.digest):       # against a GC deletion of the same content here
                await self.store.ingest(fill.digest, staged.path)
                await self.metadata.record_blob(route.local_name, digest, staged.size)
        except BaseException:
            with anyio.CancelScope(shield=True):     # (a copy already ingested is the scrub's orphan)
                await staged.discard()
            raise
        staged.close_readers()
        self._forget(fill)            # the read model has the blob: later requests link it
        await self._link_all(fill, route.local_name)
        if fill.staged is None:          # not streamed (no announced size): clients link it now
            fill.settle()
        log.info("filled %s (%d bytes) from %s for %s", digest, staged.size, route.repository.url, route.local_name)

    # ------------------------------------------------------------------ other nodes follow
    def tail_from_thread(self, digest: str, timeout: float) -> FillTail | None:
        """For a peer following this node's fill of `digest` (the gRPC servicer, on a pool
        thread): a reader of its staging file, once the upstream's response has started (at
        most `timeout` seconds from now); None when no fill of `digest` streams here."""
        loop = self._loop
        if loop is None:
            return None
        try:
            return anyio.from_thread.run(self._tail, digest, timeout, token=loop)
        except RuntimeError:       # the event loop has ended (the node stops)
            return None

    async def _tail(self, digest: str, timeout: float) -> FillTail | None:
        fill = self._fills.get(digest)
        if fill is None:
            return None
        with anyio.move_on_after(timeout):
            while not (fill.answered() or fill.following):     # until it streams here, or cannot
                await fill.changed.wait()
        return fill.staged.tail() if fill.staged is not None else None

    def _count(self, route: Route, fill: _Fill, outcome: str) -> None:
        """Figures and the audit event of this node's one upstream GET of the blob."""
        repository = route.repository
        fetched = "ok" if outcome == "filled" else outcome
        self.figures.upstream(repository.name, "GET", fetched, fill.received)
        self.figures.fill(repository.name, outcome if outcome in ("filled", "mismatch") else "failed")
        self.audit("upstream-fetch", repository=route.local_name, upstream=repository.url,
                   upstream_name=route.upstream_name, reference=str(fill.digest), method="GET",
                   bytes=fill.received, outcome=fetched)
