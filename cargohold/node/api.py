"""The OCI Distribution Spec v1.1 HTTP API of one node, as an ASGI application."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Callable
from urllib.parse import quote

import anyio

from cargohold.auth.audit import AuditLog
from cargohold.coordinator.etcd import EtcdError
from cargohold.coordinator.metadata import (
    ClusterMetadata, ConcurrentChange, MissingReferences, Referenced, TagImmutable, TagProtected,
    page,   # the read model's paging: also for the tag lists of remote repositories, built here
)
from cargohold.coordinator.records import BlobRecord, ManifestRecord
from cargohold.oci import errors
from cargohold.node.access import AccessControl
from cargohold.node.cache import ContentCache
from cargohold.node.http import (
    BodyPace, ClientDisconnected, Request, Response, error_response, json_response, loggable, send_response,
)
from cargohold.oci.manifest import MAX_MANIFEST_BYTES, OCI_INDEX, parse_manifest
from cargohold.oci.ranges import parse_chunk_range, parse_range
from cargohold.node.forward import UploadForwarder
from cargohold.node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from cargohold.runtime.pacing import Foreground
from cargohold.oci.reference import (
    Digest, lookup_reference, parse_digest, parse_reference, validate_name, validate_tag, validate_upload_id,
)
from cargohold.blobs.remote import ContentUnavailable, RemoteContent
from cargohold.blobs.store import BlobStore
from cargohold.blobs.streams import primed
from cargohold.coordinator.damaged import withdraw_damaged_copy
from cargohold.node.uploads import UploadManager, UploadSession, range_headers
from cargohold.node.virtual import VirtualRepositories
from cargohold.pullthrough.cache import CACHE_HEADER, PullThrough
from cargohold.repositories.routing import Route, route as route_of

log = logging.getLogger("cargohold.access")

_NAME = r"(?P<name>.+?)"
ROUTES: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"^/v2/{_NAME}/blobs/uploads/?$"), "uploads"),
    (re.compile(rf"^/v2/{_NAME}/blobs/uploads/(?P<upload>[^/]+)$"), "upload"),
    (re.compile(rf"^/v2/{_NAME}/blobs/(?P<digest>[^/]+)$"), "blob"),
    (re.compile(rf"^/v2/{_NAME}/manifests/(?P<reference>[^/]+)$"), "manifest"),
    (re.compile(rf"^/v2/{_NAME}/tags/list$"), "tags"),
    (re.compile(rf"^/v2/{_NAME}/referrers/(?P<digest>[^/]+)$"), "referrers"),
]
# Route names of the paths outside /v2 (metric labels: never the raw path).
SERVICE_ROUTES = {"/token": "token", "/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics"}
OCTET = "application/octet-stream"
# While etcd is away, a request that needs it is answered 503 at once with this Retry-After
# (seconds): about how long a short outage (an etcd restart, a leader election) lasts.
ETCD_RETRY_AFTER = 5
# How long a blob HEAD waits for its GC hold refresh before answering from the read model.
HEAD_HOLD_TIMEOUT = 1.0
# On registry reads answered while etcd does not answer this node: seconds since it last did.
STALE_HEADER = "X-Cargohold-Stale"


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class RegistryAPI:
    def __init__(self, metadata: ClusterMetadata, store: BlobStore, uploads: UploadManager,
                 *, node_id: str = "", ready=None, remote: RemoteContent | None = None,
                 forwarder: UploadForwarder | None = None, metrics: Metrics | None = None,
                 min_copies: int = 1, copy_timeout: float = 60.0, access: AccessControl | None = None,
                 sync_sites: int = 0, body_timeout: float = 60.0, min_body_rate: float = 0.0,
                 foreground: Foreground | None = None, pullthrough: PullThrough | None = None):
        self.metadata = metadata
        self.store = store
        self.uploads = uploads
        self.node_id = node_id
        self.remote = remote            # content held by other nodes (None: a node on its own)
        self.forwarder = forwarder
        self.metrics = metrics or Metrics()
        self.min_copies = min_copies
        self.sync_sites = sync_sites
        self.body_pace = BodyPace(body_timeout, min_body_rate)
        self.copy_timeout = copy_timeout
        self.access = access            # issue 6: None means no access control at all
        self.foreground = foreground or Foreground()   # background work paces itself while this is busy
        self.audit = access.audit if access is not None else AuditLog(None)
        self.manifest_cache = ContentCache()
        self.pullthrough = pullthrough  # remote repositories (issue 14); None: none served
        self.virtual = VirtualRepositories(self)    # virtual repositories (issue 15)
        self._ready = ready or metadata.is_current
        self._handlers = {
            "uploads": self._uploads, "upload": self._upload, "blob": self._blob,
            "manifest": self._manifest, "tags": self._tags, "referrers": self._referrers,
        }

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        request.body_pace = self.body_pace
        if not request.path.startswith("/v2"):      # probes and scrapes are not client work
            await self._respond(request, send)
            return
        self.foreground.started()
        try:
            await self._respond(request, send)
        finally:
            self.foreground.finished()

    async def _respond(self, request: Request, send) -> None:
        started = time.perf_counter()
        try:
            response = await self.handle(request)
        except errors.RegistryError as exc:
            response = error_response(exc)
            if exc.status == 408 or not await request.discard_body():
                response.header("Connection", "close")
        except ClientDisconnected:
            log.info("%s %s client disconnected", request.method, loggable(request.path))
            return
        except EtcdError as exc:
            log.warning("metadata store unavailable: %s", exc)
            response = error_response(errors.unavailable(headers={"Retry-After": str(ETCD_RETRY_AFTER)}))
        self._report_staleness(request, response)
        sent = await send_response(send, response, request.method == "HEAD")
        elapsed = time.perf_counter() - started
        self.metrics.observe(request.route, request.method, response.status, elapsed, sent, request.received)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %d %d %.1fms", request.method, loggable(request.path), response.status, sent,
                     elapsed * 1000)

    def _report_staleness(self, request: Request, response: Response) -> None:
        """Mark a registry read answered while etcd does not answer this node: its tags and
        listings may be behind by up to that many seconds (content by digest never is)."""
        if request.method in ("GET", "HEAD") and request.path.startswith("/v2"):
            stale = self.metadata.staleness()
            if stale > 0:
                response.header(STALE_HEADER, f"{stale:.0f}")

    async def handle(self, request: Request) -> Response:
        kind, params = _route(request)
        virtual = self.virtual.resolve(params["name"]) if "name" in params else None
        remote = None if virtual is not None else await self._remote_route(request, kind, params)
        if self.access is not None:
            await self._check_access(request, kind, params, remote)
        if virtual is not None:
            return await self.virtual.serve(request, kind, params, virtual)
        if remote is not None:
            return await self._remote(request, kind, params, remote)
        if kind == "service":
            return await self._service_route(request)
        if kind == "base":
            _allow(request, "GET", "HEAD")
            return json_response(200, b"{}")
        if kind == "catalog":
            _allow(request, "GET")
            return self._catalog(request)
        return await self._handlers[kind](request, **params)

    # ------------------------------------------------------------------ remote repositories
    async def _remote_route(self, request: Request, kind: str, params: dict) -> Route | None:
        """The remote repository serving this request's name, if any (issue 14)."""
        if self.pullthrough is None or "name" not in params:
            return None
        definitions = self.metadata.repository_definitions()
        if not definitions:
            return None
        found = route_of(definitions, params["name"], ns=request.query("ns"),
                         read=request.method in ("GET", "HEAD"))
        if found is not None and found.unprefixed and await self.metadata.repo_exists(params["name"]):
            return None         # Docker's default mirror: a local repository of that name wins
        return found

    async def _check_access(self, request: Request, kind: str, params: dict, remote: Route | None) -> None:
        """A mirror request (`?ns=`) is checked against the cache's name (`hub/library/alpine`);
        any other routed request against its own name and that one, so that `hub/alpine` cannot
        dodge a rule on `hub/library/**`."""
        if remote is not None and request.query("ns"):
            await self.access.check(request, kind, {**params, "name": remote.local_name})
            return
        await self.access.check(request, kind, params)
        if remote is not None and remote.local_name != params["name"]:
            self.access.require(request, remote.local_name, "pull")

    async def _remote(self, request: Request, kind: str, params: dict, remote: Route) -> Response:
        name, definition = params["name"], remote.repository
        if request.method not in ("GET", "HEAD") or kind in ("uploads", "upload"):
            raise errors.denied(f"{definition.name} is a remote repository: a read-only cache of {definition.url}",
                                detail={"name": name, "repository": definition.name})
        if not remote.allowed:
            message = (f"{name} is excluded by remote repository {definition.name}" if remote.upstream_name
                       else f"{name} is a remote repository, not an image in it")
            raise errors.name_unknown(message, detail={"name": name})
        if kind == "manifest":
            return await self._remote_manifest(request, remote, params["reference"])
        if kind == "blob":
            return await self._remote_blob(request, remote, parse_digest(params["digest"]))
        if kind == "tags":
            _allow(request, "GET")
            return self._tag_page(request, name, await self.pullthrough.tags(remote))
        return await self._referrers(request, remote.local_name, params["digest"])   # what is cached

    async def _remote_manifest(self, request: Request, remote: Route, reference: str) -> Response:
        found = await self.pullthrough.manifest(remote, reference)
        if request.method == "GET":
            self.pullthrough.pulled(remote)
        response = await self._serve_manifest(request, remote.local_name, found.digest, reference)
        return response.header(CACHE_HEADER, found.outcome)

    async def _remote_blob(self, request: Request, remote: Route, digest: Digest) -> Response:
        """What the cluster has, the ordinary way; else a fill from the upstream, streamed as it
        arrives (engine-blobs)."""
        filled, outcome = await self.pullthrough.blob(remote, digest)
        if filled is None:
            response = await self._get_blob(request, remote.local_name, digest)
        else:
            status, headers, start, length = _blob_answer(request, digest, filled.size)
            stream = filled.read(start, length) if request.method == "GET" else None
            response = Response(status, headers, stream=stream, length=length)
        return response.header(CACHE_HEADER, outcome)

    async def _service_route(self, request: Request) -> Response:
        if request.path == "/token" and self.access is not None:
            return await self.access.token(request)
        if request.path == "/healthz":
            return json_response(200, b'{"status":"ok"}')
        if request.path == "/readyz":
            return await self._readiness(request)
        if request.path == "/metrics":
            return Response(200, [(b"content-type", METRICS_CONTENT_TYPE)], self.metrics.render())
        raise errors.not_found()

    async def _readiness(self, request: Request) -> Response:
        """200 while this node can serve pulls: its read model is current, or etcd does not
        answer (then no node's can be checked, and a load balancer that took every node out
        during an etcd outage would stop pulls the nodes could serve from disk). 503 while
        etcd answers but this node's model lags. `?writable` also requires etcd: 503 while
        pushes would fail."""
        current = await self._ready()
        reachable = self.metadata.etcd_reachable()
        ready = current if request.query("writable") is not None else current or not reachable
        body = _json({"ready": ready, "revision": self.metadata.revision(), "node": self.node_id,
                      "etcd": "reachable" if reachable else "unreachable",
                      "stale_seconds": round(self.metadata.staleness(), 1)})
        return json_response(200 if ready else 503, body)

    # ------------------------------------------------------------------ discovery
    def _catalog(self, request: Request) -> Response:
        n, last = _pagination(request)
        names, more = self.virtual.catalog(n, last, self.access.visible(request) if self.access else None)
        response = json_response(200, _json({"repositories": names}))
        if more and names:
            response.header("Link", f'</v2/_catalog?n={n}&last={quote(names[-1])}>; rel="next"')
        return response

    async def _tags(self, request: Request, name: str) -> Response:
        _allow(request, "GET")
        n, last = _pagination(request)
        found = await self.metadata.tags(name, n, last)
        if found is None:
            raise errors.name_unknown(detail={"name": name})
        return self._tag_page(request, name, *found)

    def _tag_page(self, request: Request, name: str, tags: list[str], more: bool | None = None) -> Response:
        """A page of tags; `more` None: `tags` is the whole sorted list, paged here."""
        n, last = _pagination(request)
        if more is None:
            tags, more = page(tags, n, last)
        response = json_response(200, _json({"name": name, "tags": tags}))
        if more and tags:
            mirror = f"&ns={quote(ns)}" if (ns := request.query("ns")) else ""    # a mirror's next page too
            response.header("Link", f'</v2/{name}/tags/list?n={n}&last={quote(tags[-1])}{mirror}>; rel="next"')
        return response

    async def _referrers(self, request: Request, name: str, digest: str,
                         sources: list[str] | None = None) -> Response:
        """The referrers of `digest` in `name`, or in each of `sources` (a virtual name's members)."""
        _allow(request, "GET")
        subject = str(parse_digest(digest))
        wanted = request.query("artifactType")
        descriptors, seen = [], set()
        for ref_digest, record in await self._referring([name] if sources is None else sources, subject):
            if (wanted is not None and record.artifact_type != wanted) or ref_digest in seen:
                continue
            seen.add(ref_digest)
            # Annotations stay out of etcd (values must stay small): read them from the content.
            annotations = json.loads(await self._manifest_bytes(ref_digest, record.size)).get("annotations")
            descriptors.append(_descriptor(ref_digest, record, annotations))
        response = json_response(200, _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}),
                                 OCI_INDEX)
        if wanted is not None:
            response.header("OCI-Filters-Applied", "artifactType")
        return response

    async def _referring(self, names: list[str], subject: str) -> list[tuple[str, ManifestRecord]]:
        found = []
        for name in names:
            found += await self.metadata.referrers(name, subject)
        return found

    # ------------------------------------------------------------------ manifests
    async def _manifest(self, request: Request, name: str, reference: str) -> Response:
        method = request.method
        if method in ("GET", "HEAD"):
            return await self._get_manifest(request, name, reference)
        if method == "PUT":
            return await self._put_manifest(request, name, reference)
        if method == "DELETE":
            return await self._delete_manifest(request, name, reference)
        raise _method_not_allowed(request)

    async def _get_manifest(self, request: Request, name: str, reference: str) -> Response:
        tag, digest = lookup_reference(reference)
        digest_text = str(digest) if digest else await self.metadata.resolve_tag(name, tag)
        return await self._serve_manifest(request, name, digest_text, reference)

    async def _serve_manifest(self, request: Request, name: str, digest_text: str | None,
                              reference: str) -> Response:
        record = await self.metadata.manifest(name, digest_text) if digest_text else None
        if record is None:
            raise errors.manifest_unknown(detail={"name": name, "reference": reference})
        headers = [(b"content-type", record.media_type.encode()),
                   (b"docker-content-digest", digest_text.encode()),
                   (b"etag", f'"{digest_text}"'.encode())]
        if request.method == "HEAD":
            return Response(200, headers, length=record.size)
        return Response(200, headers, await self._manifest_bytes(digest_text, record.size))

    async def _manifest_bytes(self, digest_text: str, size: int) -> bytes:
        """A manifest's content (its size from its record, which may be newer than our read
        model): from the cache, this node's verified copy, or a peer."""
        data = self.manifest_cache.get(digest_text)
        if data is None:
            data = await self._local_manifest(parse_digest(digest_text), size)
            if data is None:
                data = await self._read_remote_all(digest_text, size)
            self.manifest_cache.put(digest_text, data)
        return data

    async def _local_manifest(self, digest: Digest, size: int) -> bytes | None:
        """This node's copy, checked against its digest (a manifest is small); a damaged copy
        is withdrawn and None returned, so that a peer serves it."""
        if not await self._usable_local_copy(digest, size):
            return None
        try:
            data = await self.store.read_all(digest)
        except errors.RegistryError:
            if self.remote is None:
                raise
            return None     # dropped between its stat and its read (a non-owner's copy): a peer serves it
        if await anyio.to_thread.run_sync(Digest.of, data, digest.algorithm) == digest:
            return data
        if self.remote is None:
            raise errors.unavailable(f"the stored copy of {digest} is damaged", detail={"digest": str(digest)})
        await withdraw_damaged_copy(self.metadata, self.store, digest, "read found a corrupt manifest")
        return None

    async def _read_remote_all(self, digest_text: str, size: int) -> bytes:
        if self.remote is None:
            raise errors.blob_unknown(detail={"digest": digest_text})
        try:
            return await self.remote.read_all(digest_text, size)
        except ContentUnavailable as exc:
            raise errors.unavailable(str(exc)) from None

    async def _put_manifest(self, request: Request, name: str, reference: str) -> Response:
        tag, wanted = parse_reference(reference)
        tag_params = _tag_params(request) if wanted is not None else []
        body = await request.read_body(MAX_MANIFEST_BYTES)
        parsed = parse_manifest(body, request.header("content-type"))
        digest = Digest.of(body, wanted.algorithm if wanted else "sha256")
        if wanted is not None and digest != wanted:
            raise errors.digest_invalid(detail={"reference": reference, "actual": str(digest)})
        record = ManifestRecord.of(parsed, len(body), time.time())
        try:
            await self._store_manifest(name, digest, body, record, tag, tag_params)
        except TagImmutable as exc:
            raise errors.denied(str(exc), detail={"rule": exc.rule}) from None
        except MissingReferences as missing:
            if missing.blobs:
                raise errors.manifest_blob_unknown(detail={"blobs": missing.blobs}) from None
            raise errors.manifest_blob_unknown("manifest references manifests unknown to the repository",
                                               detail={"manifests": missing.manifests}) from None
        self.manifest_cache.put(str(digest), body)
        await self._wait_for_copies(str(digest))   # --min-copies / --sync-sites hold the 201
        self.audit.record("push", request, repository=name, reference=reference, digest=str(digest),
                          tag=tag, tags=tag_params or None)
        response = Response(201).header("Location", f"/v2/{name}/manifests/{digest}")
        response.header("Docker-Content-Digest", str(digest))
        for pushed in tag_params:
            response.header("OCI-Tag", pushed)
        if parsed.subject is not None:
            response.header("OCI-Subject", str(parsed.subject))
        return response

    async def _store_manifest(self, name: str, digest: Digest, body: bytes, record: ManifestRecord,
                              tag: str | None, tag_params: list[str]) -> None:
        """Write the bytes, then index them in one txn; bytes the txn refused are removed at once
        (not left for a scrub), unless this node held them before."""
        async with self.store.locked(digest):
            held_before = await self.store.stat(digest) is not None
            await self.store.write(digest, body)
            try:
                await self.metadata.put_manifest(name, str(digest), record, tag, tag_params)
            except (MissingReferences, TagImmutable):
                if not held_before:
                    with anyio.CancelScope(shield=True):
                        await self.store.delete(digest)
                raise

    async def _delete_manifest(self, request: Request, name: str, reference: str) -> Response:
        tag, digest = lookup_reference(reference)
        try:
            if digest is not None:
                found = await self.metadata.delete_manifest(name, str(digest), self._may_remove_tag(request, name))
            else:
                found = await self.metadata.delete_tag(name, tag)
        except ConcurrentChange as exc:
            raise errors.unavailable(str(exc)) from None
        except TagImmutable as exc:
            raise errors.denied(str(exc), detail={"rule": exc.rule}) from None
        except TagProtected as exc:
            self.audit.record("denied", request, repository=name, reference=exc.tag, action="delete",
                              status=403, reason="protected tag")
            raise errors.denied(str(exc), detail={"repository": name, "tag": exc.tag}) from None
        except Referenced as exc:
            raise _still_referenced(exc) from None
        if not found:
            raise errors.manifest_unknown(detail={"name": name, "reference": reference})
        self.audit.record("delete", request, repository=name, reference=reference,
                          digest=str(digest) if digest is not None else found)   # by tag: what it pointed at
        return Response(202)

    def _may_remove_tag(self, request: Request, repo: str) -> Callable[[str], bool] | None:
        """Tag protection, judged again by the coordinator on every tag its delete by digest
        would remove: the check before routing saw only the tags this node's read model knew,
        and a tag pushed through another node a moment ago may be missing there."""
        identity = request.auth
        if self.access is None or identity is None:
            return None
        policy, subject = self.access.policy, identity.subject
        return lambda tag: policy.may_touch_tag(subject, repo, tag)

    # ------------------------------------------------------------------ blobs
    async def _blob(self, request: Request, name: str, digest: str) -> Response:
        parsed = parse_digest(digest)
        if request.method in ("GET", "HEAD"):
            return await self._get_blob(request, name, parsed)
        if request.method == "DELETE":
            try:
                unlinked = await self.metadata.unlink_blob(name, str(parsed))
            except Referenced as exc:
                raise _still_referenced(exc) from None
            except ConcurrentChange as exc:
                raise errors.unavailable(str(exc)) from None
            if not unlinked:
                raise errors.blob_unknown(detail={"digest": str(parsed)})
            self.audit.record("delete", request, repository=name, digest=str(parsed))
            return Response(202).header("Docker-Content-Digest", str(parsed))
        raise _method_not_allowed(request)

    async def _get_blob(self, request: Request, name: str, digest: Digest) -> Response:
        record = await self.metadata.blob_in_repo(name, str(digest))
        if record is None or not await self._keep_hold(request, str(digest), record):
            raise errors.blob_unknown(detail={"digest": str(digest)})
        size = record.size
        status, headers, start, length = _blob_answer(request, digest, size)
        if request.method == "HEAD":
            return Response(status, headers, length=length)
        return Response(status, headers, stream=await self._blob_stream(digest, size, start, length), length=length)

    async def _blob_stream(self, digest: Digest, size: int, start: int, length: int):
        """This node's copy when it can serve it, else a peer's, with the first chunk already
        read: the response commits its status and Content-Length only once some source has
        delivered, since after that a failure can only close the connection short."""
        if await self._usable_local_copy(digest, size):
            try:
                return await primed(self.store.read(digest, start, length))
            except errors.RegistryError:
                # Gone since its stat: placement dropped a copy this node does not own (or a
                # sweep took it) the moment we looked. The copies that stand serve it.
                if self.remote is None:
                    raise
                log.info("local copy of %s went between its stat and its open; reading it from a peer", digest)
        if self.remote is None:
            raise errors.blob_unknown("blob is indexed but not held by this node", detail={"digest": str(digest)})
        if not await self.remote.can_read(str(digest)):
            raise errors.unavailable("no live node holds this blob right now", detail={"digest": str(digest)})
        try:
            return await primed(self.remote.read(str(digest), start, length))
        except ContentUnavailable as exc:
            raise errors.unavailable(str(exc), detail={"digest": str(digest)}) from None

    async def _usable_local_copy(self, digest: Digest, size: int) -> bool:
        """Whether this node's file of `digest` can be served: it has the recorded size (the
        digest fixes it, so any other size is damage). A copy this node advertises and cannot
        serve (gone, truncated) is withdrawn: peers serve it, and placement fetches a good one."""
        local_size = await self.store.stat(digest)
        if local_size == size:
            return True
        if self.remote is None:
            return local_size is not None      # nowhere else to read it from
        if local_size is not None or self.metadata.publishes_copy(str(digest)):
            found = "no file" if local_size is None else f"{local_size} bytes of {size}"
            await withdraw_damaged_copy(self.metadata, self.store, digest, f"read found {found}")
        return False

    async def _keep_hold(self, request: Request, digest: str, record: BlobRecord) -> bool:
        """Refresh the blob's GC hold without letting etcd hold up the read; False if the
        refresh found the blob swept.

        GET: in the background. HEAD: docker skips the upload of a layer HEAD answers 200 for
        and PUTs the manifest next; a refresh that commits before a sweep's re-check makes the
        sweep fail and the push succeed, one that finds the blob swept answers 404 so docker
        uploads it again. Safety does not rest on it (the manifest PUT's guard needs the
        blob's `in/` key, which the sweep deletes), only sparing docker a failed push; so the
        HEAD waits for it briefly and, with etcd slow or away (when no push can complete
        anyway), answers from the read model.
        """
        if request.method == "GET":
            self.metadata.refresh_hold_later(digest, record)
            return True
        return await self.metadata.refresh_hold(digest, record, HEAD_HOLD_TIMEOUT) is not False

    # ------------------------------------------------------------------ uploads
    async def _uploads(self, request: Request, name: str) -> Response:
        _allow(request, "POST")
        self.metadata.check_writable()     # during an etcd outage: 503 before the layer's bytes come
        mount = request.query("mount")
        if mount is not None:
            mounted = await self._mount(request, name, mount, request.query("from"))
            if mounted is not None:
                return mounted
        digest_param = request.query("digest")
        if digest_param is not None:
            digest = parse_digest(digest_param)
            session = await self.uploads.create(name, *_opener(request))
            return await self._finish_upload(request, session, digest, monolithic=True)
        session = await self.uploads.create(name, *_opener(request))
        return _upload_progress(202, session, 0)

    async def _mount(self, request: Request, name: str, mount: str, source: str | None) -> Response | None:
        """A cross-repository mount of `mount` into `name`: 201, or None for a plain upload.

        Without pull on the source it is a plain upload: the answer never reveals the blob."""
        if source is None:
            source = self._discovered_mount_source(request, name, mount)
        else:
            source = await self.virtual.mount_source(request, validate_name(source), parse_digest(mount))
        if source is None:
            return None
        mounted = await self._try_mount(name, parse_digest(mount), source)
        if mounted is not None:
            self.audit.record("mount", request, repository=name, digest=mount, source=source)
        return mounted

    def _discovered_mount_source(self, request: Request, name: str, mount: str) -> str | None:
        """A mount without `from` (the spec's automatic content discovery, which the conformance
        suite tests as "anonymous mount"): a repository that links the blob and that the caller
        may pull, the target itself first. The read model answers: one that lags only turns the
        mount into a plain upload, and the mount's transaction checks the link again. A `mount`
        that is no digest is a plain upload too, as for an unknown blob."""
        try:
            digest = parse_digest(mount)
        except errors.RegistryError:
            return None
        state = self.metadata.blob_states().get(str(digest))
        linked = sorted(state.repos, key=lambda repo: (repo != name, repo)) if state is not None else []
        return next((repo for repo in linked if self.access is None or self.access.may(request, repo, "pull")), None)

    async def _try_mount(self, name: str, digest: Digest, source: str) -> Response | None:
        if await self.metadata.link_blob(name, source, str(digest)) is None:
            return None
        return _blob_created(name, digest)

    async def _upload(self, request: Request, name: str, upload: str) -> Response:
        validate_upload_id(upload)
        if self.forwarder is not None and upload[32:] != self.forwarder.tag:
            return await self.forwarder.forward(request, upload[32:], upload)
        session = await self.uploads.get(name, upload, account=_opener(request)[0])
        method = request.method
        if method == "GET":
            return _upload_progress(204, session, await self.uploads.size(session))
        if method == "PATCH":
            start, length = _chunk_range(request)
            size = await self.uploads.append(session, request.body_chunks(), start=start, length=length)
            return _upload_progress(202, session, size)
        if method == "PUT":
            digest_param = request.query("digest")
            if digest_param is None:
                raise errors.digest_invalid("the digest query parameter is required")
            return await self._finish_upload(request, session, parse_digest(digest_param))
        if method == "DELETE":
            await self.uploads.cancel(session)
            self.audit.record("upload_cancelled", request, repository=name, upload=upload)
            return Response(204)
        raise _method_not_allowed(request)

    async def _finish_upload(self, request: Request, session: UploadSession, digest: Digest,
                             monolithic: bool = False) -> Response:
        """Take the final chunk (if any), verify the digest, store and index the blob.

        A failed monolithic upload leaves nothing behind; a failed last chunk of a chunked
        upload leaves the session as it was, so the client can retry it.
        """
        try:
            start, length = _chunk_range(request)
            await self.uploads.append(session, request.body_chunks(), start=start, length=length)
            async with self.store.locked(digest):   # against a GC deletion of the same content here
                size = await self.uploads.complete(session, digest)
                await self.metadata.record_blob(session.repo, str(digest), size)
        except BaseException:
            if monolithic:
                with anyio.CancelScope(shield=True):
                    await self.uploads.cancel(session)
            raise
        self.audit.record("upload", request, repository=session.repo, digest=str(digest), size=size)
        await self._wait_for_copies(str(digest))
        return _blob_created(session.repo, digest)

    async def _wait_for_copies(self, digest: str) -> None:
        """--min-copies and --sync-sites: acknowledge only when that many nodes (and other
        sites) hold the content. Past the timeout the client gets 503 and retries; the content
        stays and keeps replicating."""
        if self.remote is None:
            return
        if self.min_copies > 1 and not await self.remote.wait_for_copies(digest, self.min_copies,
                                                                        self.copy_timeout):
            raise errors.unavailable(f"stored, but fewer than {self.min_copies} nodes hold it yet; retry")
        if self.sync_sites > 0 and not await self.remote.wait_for_sites(digest, self.sync_sites,
                                                                       self.copy_timeout):
            raise errors.unavailable(f"stored, but fewer than {self.sync_sites} other sites hold it yet; retry")


# ---------------------------------------------------------------------- helpers
async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _route(request: Request) -> tuple[str, dict]:
    """The route's kind ("service", "base", "catalog" or a ROUTES kind) and its parameters."""
    path = request.path
    if not path.startswith("/v2"):
        request.route = SERVICE_ROUTES.get(path, "other")
        return "service", {}
    if path in ("/v2/", "/v2"):
        request.route = "base"
        return "base", {}
    if path == "/v2/_catalog":
        request.route = "catalog"
        return "catalog", {}
    for pattern, kind in ROUTES:
        match = pattern.match(path)
        if match:
            request.route = kind
            params = match.groupdict()
            params["name"] = validate_name(params["name"])
            return kind, params
    raise errors.not_found()


def _blob_answer(request: Request, digest: Digest, size: int) -> tuple[int, list, int, int]:
    """Status, headers, first byte and length of the answer to a blob GET/HEAD (with `Range`)."""
    headers = [(b"docker-content-digest", str(digest).encode()), (b"accept-ranges", b"bytes"),
               (b"content-type", OCTET.encode()), (b"etag", f'"{digest}"'.encode())]
    start, end = 0, size - 1
    status = 200
    wanted = parse_range(request.header("range"), size) if request.header("range") else None
    if wanted is not None:
        start, end = wanted
        status = 206
        headers.append((b"content-range", f"bytes {start}-{end}/{size}".encode()))
    return status, headers, start, end - start + 1


def _allow(request: Request, *methods: str) -> None:
    if request.method not in methods:
        raise _method_not_allowed(request)


def _still_referenced(exc: Referenced) -> errors.RegistryError:
    """409 DENIED: the delete conflicts with the repository's state (a manifest uses the
    content) and would succeed once that manifest is gone; 403 would read as a permission
    problem and 405 as "deletes are disabled" (zot answers 405 DENIED)."""
    return errors.RegistryError("DENIED", str(exc), 409, detail={"digest": exc.digest, "manifest": exc.by})


def _method_not_allowed(request: Request) -> errors.RegistryError:
    return errors.unsupported(f"method {request.method} is not allowed here")


def _pagination(request: Request) -> tuple[int | None, str | None]:
    raw_n = request.query("n")
    n = None
    if raw_n is not None and raw_n != "":
        if not (raw_n.isascii() and raw_n.isdigit()) or len(raw_n) > 9:
            raise errors.unsupported("n must be a non-negative integer", status=400)
        n = int(raw_n)
    return n, request.query("last") or None


def _tag_params(request: Request) -> list[str]:
    """The `tag` parameters of a manifest PUT by digest: tags set in the same transaction, each
    confirmed with an `OCI-Tag` header (the spec's push of several tags at once, which is also
    how a manifest with a sha512 digest gets a tag). A malformed one is MANIFEST_INVALID."""
    return list(dict.fromkeys(validate_tag(tag) for tag in request.query_all("tag")))


def _chunk_range(request: Request) -> tuple[int | None, int | None]:
    """(start, length) from Content-Range and Content-Length; 416 when malformed."""
    return parse_chunk_range(request.header("content-range"), request.header("content-length"))


def _opener(request: Request) -> tuple[str, str]:
    """Who opens an upload session: the account's login ("" for anonymous), and the client address."""
    identity = request.auth
    login = identity.subject.login if identity is not None and not identity.subject.anonymous else ""
    return login, request.client


def _upload_progress(status: int, session: UploadSession, size: int) -> Response:
    response = Response(status)
    for name, value in range_headers(session, size).items():
        response.header(name, value)
    return response


def _blob_created(name: str, digest: Digest) -> Response:
    response = Response(201).header("Location", f"/v2/{name}/blobs/{digest}")
    return response.header("Docker-Content-Digest", str(digest))


def _descriptor(digest: str, record: ManifestRecord, annotations: dict | None) -> dict:
    descriptor: dict = {"mediaType": record.media_type, "digest": digest, "size": record.size}
    if record.artifact_type:
        descriptor["artifactType"] = record.artifact_type
    if annotations:
        descriptor["annotations"] = annotations
    return descriptor
