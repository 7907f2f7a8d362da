"""`PullThrough`: what a node does for a request routed to a remote repository (manifests, tags,
tag lists; blobs through `BlobFiller`), with one `UpstreamClient` per definition.

Cached content is an ordinary repository of the cluster under the route's `local_name`
(`hub/library/alpine`): a manifest fetched from the upstream is stored like a pushed one (its
bytes in the blob store, its record and tag in etcd), so every node serves it the ordinary way.

- By digest: immutable. In the cluster: served, never revalidated; else fetched and verified.
- By tag: fresh while the cluster-wide check record (`coordinator.cachecheck`) is younger than
  the ttl; after that one `HEAD` upstream (not a pull on Docker Hub): same digest, the check is
  renewed; moved, the new manifest is fetched by digest (the old one stays, pullable by digest).
- The upstream down, slow or rate limiting: what is cached is served as "stale" (a warning line
  and the metric); with nothing cached the request fails with a JSON error within the upstream
  client's timeouts (`failure()` says which).

Concurrent requests for the same (image, reference) on one node share one upstream call.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol, TypeVar

import anyio

from cargohold.blobs.store import BlobStore
from cargohold.coordinator.cachecheck import TagCheck, last_check, record_check
from cargohold.coordinator.etcd import EtcdError
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.records import ManifestRecord
from cargohold.coordinator.upstreamstate import SiteOfflineBoard
from cargohold.oci import errors
from cargohold.oci.errors import RegistryError
from cargohold.oci.manifest import parse_manifest
from cargohold.oci.reference import Digest, is_digest, parse_digest
from cargohold.pullthrough.figures import CacheFigures
from cargohold.pullthrough.fill import BlobFiller, FilledBlob
from cargohold.repositories.definitions import RemoteRepository
from cargohold.repositories.routing import Route
from cargohold.upstream.client import Timeouts, UpstreamClient
from cargohold.upstream.errors import (
    DigestMismatch, UpstreamError, UpstreamNotFound, UpstreamUnavailable, outcome_label,
)

log = logging.getLogger("cargohold.pullthrough")

# connect 5 s, read 30 s (a stalled socket), a whole manifest or tag list within 60 s
UPSTREAM_TIMEOUTS = Timeouts(connect=5.0, read=30.0, total=60.0)
# A replaced client may still serve requests that began before the change: closed after this.
CLIENT_CLOSE_DELAY = 90.0
CHECKS_REMEMBERED = 10_000       # per-node memory of tag checks (etcd has them all)
CACHE_HEADER = "X-Cargohold-Cache"
HIT, MISS, REVALIDATED, STALE, ERROR = "hit", "miss", "revalidated", "stale", "error"

T = TypeVar("T")


class PullRecorder(Protocol):
    """Notes that an image was pulled (eviction's `pullthrough/usage.py PullRecorder`)."""

    def note(self, local_name: str) -> None: ...


@dataclass(frozen=True)
class CachedManifest:
    digest: str
    outcome: str            # hit | miss | revalidated | stale: the X-Cargohold-Cache header


@dataclass
class _TagList:
    tags: list[str]
    fetched: float


class PullThrough:
    def __init__(self, metadata: ClusterMetadata, store: BlobStore, *, figures: CacheFigures | None = None,
                 audit: Callable[..., None] = lambda event, **fields: None, recorder: PullRecorder | None = None,
                 filler: BlobFiller | None = None, timeouts: Timeouts = UPSTREAM_TIMEOUTS,
                 clock: Callable[[], float] = time.time, verify_tls: bool = True,
                 site: str | None = None, node_id: str = ""):
        self.metadata = metadata
        self.site = site            # set: an upstream found offline is so for the whole site
        self.node_id = node_id
        self.store = store
        self.figures = figures or CacheFigures()
        self.audit = audit
        self.recorder = recorder
        self.filler = filler
        self.timeouts = timeouts
        self.clock = clock
        self.verify_tls = verify_tls
        self._clients: dict[str, tuple[RemoteRepository, UpstreamClient]] = {}
        self._retired: list[UpstreamClient] = []       # replaced, to be closed by run()
        self._checks: dict[tuple[str, str], TagCheck] = {}
        self._tag_lists: dict[str, _TagList] = {}
        self._flights: dict[tuple[str, str], list] = {}     # key -> [lock, users]

    # ------------------------------------------------------------------ upstream clients
    def client(self, repository: RemoteRepository) -> UpstreamClient:
        """The upstream client of `repository` as defined now (a changed definition gets a new
        one: url, credentials, offline period)."""
        entry = self._clients.get(repository.name)
        if entry is not None and entry[0] == repository:
            return entry[1]
        if entry is not None:       # changed before run() saw it: run() closes the old one
            self._retire(repository.name)
        client = UpstreamClient(repository.url, username=repository.username, password=repository.password,
                                timeouts=self.timeouts, offline_period=repository.offline_period,
                                verify_tls=self.verify_tls, board=self._offline_board(repository))
        self._clients[repository.name] = (repository, client)
        return client

    def _offline_board(self, repository: RemoteRepository) -> SiteOfflineBoard | None:
        if self.site is None:
            return None
        return SiteOfflineBoard(self.metadata, self.site, repository.name, self.node_id)

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the definitions (section "repositories" of the watch): a changed or removed
        remote repository's client is dropped (and closed a little later), its tag lists
        forgotten. Closes every client when cancelled."""
        try:
            with self.metadata.changes(lambda _blobs, sections: "repositories" in sections) as changed:
                async with anyio.create_task_group() as tg:
                    task_status.started()
                    while True:
                        await changed.wait()
                        for client in self._drop_outdated():
                            tg.start_soon(_close_later, client, CLIENT_CLOSE_DELAY)
        finally:
            with anyio.CancelScope(shield=True):
                for client in [*self._retired, *(client for _, client in self._clients.values())]:
                    await client.aclose()

    def _drop_outdated(self) -> list[UpstreamClient]:
        definitions = self.metadata.repository_definitions()
        for name, (definition, _) in list(self._clients.items()):
            if definitions.get(name) != definition:
                self._retire(name)
        dropped, self._retired = self._retired, []
        return dropped

    def _retire(self, name: str) -> None:
        """Forget a changed or removed definition's client (closed later) and tag lists."""
        _, client = self._clients.pop(name)
        self._retired.append(client)
        self._tag_lists = {k: v for k, v in self._tag_lists.items() if not k.startswith(name + "/")}
        log.info("remote repository %s changed: its upstream client is rebuilt", name)

    # ------------------------------------------------------------------ manifests
    async def manifest(self, route: Route, reference: str) -> CachedManifest:
        """Make sure the cluster has the manifest `reference` of `route` (fetching it if needed)
        and say which digest to serve and how it was found. Raises RegistryError."""
        name = route.repository.name
        try:
            if is_digest(reference):
                found = await self._by_digest(route, str(parse_digest(reference)))
            else:
                found = await self._by_tag(route, reference)
        except UpstreamError as exc:
            self.figures.request(name, ERROR)
            raise failure(exc, "manifest", reference, self.client(route.repository).offline.remaining()) from None
        self.figures.request(name, found.outcome)
        return found

    def pulled(self, route: Route) -> None:
        """A manifest GET (not HEAD) of a cached image: eviction's last-pulled time."""
        if self.recorder is not None:
            self.recorder.note(route.local_name)

    async def _by_digest(self, route: Route, digest: str) -> CachedManifest:
        if await self.metadata.manifest(route.local_name, digest) is not None:
            return CachedManifest(digest, HIT)
        async with self._one_at_a_time(route.local_name, digest):
            if await self.metadata.manifest(route.local_name, digest) is not None:
                return CachedManifest(digest, HIT)      # another request just fetched it
            await self._fetch(route, digest, tag=None)
            return CachedManifest(digest, MISS)

    async def _by_tag(self, route: Route, tag: str) -> CachedManifest:
        local = route.local_name
        cached = await self.metadata.resolve_tag(local, tag)
        if cached is not None and await self._fresh(route, tag, cached):
            return CachedManifest(cached, HIT)
        async with self._one_at_a_time(local, tag):
            cached = await self.metadata.resolve_tag(local, tag)
            if cached is not None and await self._fresh(route, tag, cached):
                return CachedManifest(cached, HIT)      # checked meanwhile, here or on another node
            try:
                return await self._revalidate(route, tag, cached)
            except UpstreamNotFound:
                raise
            except UpstreamError as exc:
                if cached is None:
                    raise
                log.warning("serving stale %s:%s (%s) from the cache: the upstream %s failed: %s",
                            local, tag, cached, route.repository.url, exc)
                return CachedManifest(cached, STALE)

    async def _revalidate(self, route: Route, tag: str, cached: str | None) -> CachedManifest:
        """Ask the upstream about `tag`: nothing cached, a GET by tag; else a HEAD, then a GET by
        digest only if the tag moved."""
        if cached is None:
            digest = await self._fetch(route, tag, tag=tag)
            return CachedManifest(digest, MISS)
        upstream = self.client(route.repository)
        head = await self._upstream(route, "HEAD", tag, upstream.head_manifest(route.upstream_name, tag))
        if head is None:
            raise UpstreamNotFound(f"manifest {route.upstream_name}:{tag}: not found upstream")
        if head.digest == cached:
            await self._checked(route.local_name, tag, cached)
            return CachedManifest(cached, REVALIDATED)
        log.info("%s:%s moved upstream from %s to %s", route.local_name, tag, cached, head.digest)
        return CachedManifest(await self._fetch(route, head.digest, tag=tag), MISS)

    async def _fetch(self, route: Route, reference: str, *, tag: str | None) -> str:
        """Get the manifest `reference` from the upstream (a digest the cluster already has is
        only tagged), verify it, store its bytes and record it (and `tag`): its digest."""
        local = route.local_name
        if is_digest(reference):
            record = await self.metadata.manifest(local, reference)
            if record is not None:
                await self._record(local, reference, record, tag)
                return reference
        upstream = self.client(route.repository)
        body, media_type, digest = await self._upstream(
            route, "GET", reference, upstream.get_manifest(route.upstream_name, reference), size=len)
        try:
            parsed = parse_manifest(body, media_type)
        except RegistryError as exc:
            raise UpstreamError(f"manifest {route.upstream_name}@{digest}: not a manifest we serve: "
                                f"{exc.message}") from None
        record = ManifestRecord.of(parsed, len(body), self.clock())
        parsed_digest = parse_digest(digest)
        async with self.store.locked(parsed_digest):
            await self.store.write(parsed_digest, body)
            await self._record(local, digest, record, tag)
        return digest

    async def _record(self, local: str, digest: str, record: ManifestRecord, tag: str | None) -> None:
        await self.metadata.put_cached_manifest(local, digest, record, tag)
        if tag is not None:
            await self._checked(local, tag, digest)

    # ------------------------------------------------------------------ tag checks
    async def _fresh(self, route: Route, tag: str, cached: str) -> bool:
        """Whether the upstream confirmed `cached` for `tag` less than a ttl ago: this node's
        memory first, then the cluster's record (another node may have checked)."""
        key, ttl, now = (route.local_name, tag), route.repository.ttl, self.clock()
        check = self._checks.get(key)
        if check is None or check.digest != cached or not check.fresh(ttl, now):
            try:
                check = await last_check(self.metadata, route.local_name, tag)
            except EtcdError:
                return False            # etcd away: ask the upstream (served stale if it fails too)
            if check is not None:
                self._remember(key, check)
        return check is not None and check.digest == cached and check.fresh(ttl, now)

    async def _checked(self, local: str, tag: str, digest: str) -> None:
        check = TagCheck(digest, self.clock())
        self._remember((local, tag), check)
        try:
            await record_check(self.metadata, local, tag, check)
        except EtcdError as exc:        # only costs another node a HEAD
            log.debug("could not record the check of %s:%s: %s", local, tag, exc)

    def _remember(self, key: tuple[str, str], check: TagCheck) -> None:
        if len(self._checks) >= CHECKS_REMEMBERED and key not in self._checks:
            self._checks.clear()
        self._checks[key] = check

    # ------------------------------------------------------------------ tag lists
    async def tags(self, route: Route) -> list[str]:
        """The image's tags, sorted: the upstream's list (kept for the ttl on this node), or
        what the cluster has cached while the upstream fails. Raises RegistryError."""
        local, now = route.local_name, self.clock()
        kept = self._tag_lists.get(local)
        if kept is not None and now - kept.fetched < route.repository.ttl:
            return kept.tags
        upstream = self.client(route.repository)
        try:
            tags = await self._upstream(route, "GET", "tags/list", upstream.tags(route.upstream_name), size=_tags_size)
        except UpstreamNotFound as exc:
            raise failure(exc, "tags", "", 0) from None
        except UpstreamError as exc:
            found = await self.metadata.tags(local, None, None)
            if found is None:
                raise failure(exc, "tags", "", upstream.offline.remaining()) from None
            log.warning("serving the cached tags of %s: the upstream %s failed: %s", local, route.repository.url, exc)
            return found[0]
        self._tag_lists[local] = _TagList(sorted(set(tags)), now)
        return self._tag_lists[local].tags

    # ------------------------------------------------------------------ blobs
    async def blob(self, route: Route, digest: Digest) -> tuple[FilledBlob | None, str]:
        """(engine-blobs' FilledBlob streaming from the fill, or None: serve the cluster's blob the
        ordinary way; hit or miss). Linked into `route.local_name` already: a hit. Else the
        filler links what the cluster has (a hit too) or fills it from the upstream (a miss,
        even when the fill is done before `open` returns). Raises RegistryError."""
        name = route.repository.name
        if await self.metadata.blob_in_repo(route.local_name, str(digest)) is not None:
            self.figures.request(name, HIT)
            return None, HIT
        if self.filler is None:
            raise errors.unavailable("this node cannot fetch blobs from upstreams", detail={"digest": str(digest)})
        state = self.metadata.blob_states().get(str(digest))
        outcome = HIT if state is not None and state.repos else MISS
        upstream = self.client(route.repository)
        try:
            filled = await self.filler.open(upstream, route, digest)
        except UpstreamError as exc:
            self.figures.request(name, ERROR)
            raise failure(exc, "blob", str(digest), upstream.offline.remaining()) from None
        self.figures.request(name, outcome)
        return filled, outcome

    # ------------------------------------------------------------------ helpers
    async def _upstream(self, route: Route, method: str, reference: str, call: Awaitable[T],
                        size: Callable[[T], int] = lambda _: 0) -> T:
        """Await one upstream call, counting it and writing its audit event (never credentials)."""
        repository = route.repository
        event = {"repository": route.local_name, "upstream": repository.url, "upstream_name": route.upstream_name,
                 "reference": reference, "method": method}
        try:
            result = await call
        except UpstreamError as exc:
            outcome = outcome_label(exc)
            self.figures.upstream(repository.name, method, outcome)
            self.audit("upstream-fetch", **event, bytes=0, outcome=outcome)
            raise
        received = size(result) if result is not None else 0
        self.figures.upstream(repository.name, method, "ok", received)
        self.audit("upstream-fetch", **event, bytes=received, outcome="ok")
        return result

    @asynccontextmanager
    async def _one_at_a_time(self, local: str, reference: str) -> AsyncIterator[None]:
        key = (local, reference)
        flight = self._flights.setdefault(key, [anyio.Lock(), 0])
        flight[1] += 1
        try:
            async with flight[0]:
                yield
        finally:
            flight[1] -= 1
            if flight[1] == 0:
                del self._flights[key]


async def _close_later(client: UpstreamClient, delay: float) -> None:
    """After the requests that began with it are done; at once when the node stops."""
    try:
        await anyio.sleep(delay)
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


def _tags_size(tags: list[str]) -> int:
    return sum(len(tag) + 3 for tag in tags)       # about the JSON's size


def failure(exc: UpstreamError, what: str, reference: str, offline_for: float) -> RegistryError:
    """The answer to a request the upstream could not serve, with nothing cached (pure).

    Down, slow, refusing or rate limiting (and assumed offline after that): 503 UNAVAILABLE with
    Retry-After. It answered badly (5xx, wrong bytes, refused our credentials): 502. It has no
    such thing: 404 MANIFEST_UNKNOWN / BLOB_UNKNOWN / NAME_UNKNOWN."""
    detail = {"reference": reference, "upstream": str(exc)} if reference else {"upstream": str(exc)}
    unknown = {"manifest": errors.manifest_unknown, "blob": errors.blob_unknown}.get(what, errors.name_unknown)
    if isinstance(exc, UpstreamNotFound):
        return unknown(f"{what} not found upstream", detail=detail)
    if isinstance(exc, DigestMismatch):
        return unknown(f"the upstream sent a {what} that does not match its digest", detail=detail, status=502)
    if isinstance(exc, UpstreamUnavailable) and exc.status is None:
        wait = getattr(exc, "retry_after", None) or offline_for or 1.0
        return errors.unavailable(f"the upstream cannot be reached now and nothing is cached: {exc.reason}",
                                  detail=detail, headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return errors.unavailable(f"the upstream failed: {exc}", detail=detail, status=502)
