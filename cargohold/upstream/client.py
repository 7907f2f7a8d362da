"""`UpstreamClient`: manifests, blobs and tags from another OCI/Docker registry over httpx.

Auth (the Docker token flow, or Basic) and failure classification follow `protocol`; every call
is bounded by explicit timeouts and is cancellable. While the upstream is assumed offline
(`OfflineTracker`) calls fail at once with UpstreamUnavailable.

Credentials live in a private object with no useful repr; they are never put in a message."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import anyio
import httpcore
import httpx

from cargohold.oci.manifest import MAX_MANIFEST_BYTES, SUPPORTED_TYPES
from cargohold.oci.reference import is_digest, parse_digest
from cargohold.oci.errors import RegistryError
from cargohold.upstream import errors, protocol
from cargohold.upstream.offline import OfflineBoard, OfflineTracker
from cargohold.upstream.verify import hash_chunk

ACCEPT_MANIFESTS = ", ".join(sorted(SUPPORTED_TYPES))
MAX_TAG_PAGES = 1000          # a Link loop from a broken upstream ends here
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
# httpcore receives at most 64 KiB at a time, so a blob streamed from an upstream costs a trip
# through h11 and the event loop per 64 KiB. Up to 1 MiB at a time cut a node's CPU for a cold
# 64 MiB fill by about a fifth (0.35 -> 0.27 s on asyncio, 0.4 -> 0.28 s on trio). httpcore has
# no setting for it, only this class attribute (it also serves the node's upload relay).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Timeouts:
    """Seconds. `connect` and `read` bound each step of every call (a stalled socket fails after
    `read`); `total` bounds a whole non-streaming call (manifest, tags, token)."""
    connect: float = 5.0
    read: float = 30.0
    total: float = 60.0

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.read, pool=self.connect)


class _Credentials:
    """Username and password, kept out of every repr, str and traceback-local display."""
    __slots__ = ("_basic",)

    def __init__(self, username: str, password: str):
        self._basic = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    def header(self) -> str:
        return self._basic

    def __repr__(self) -> str:
        return "<credentials>"


@dataclass(frozen=True)
class ManifestHead:
    digest: str
    media_type: str
    size: int


class UpstreamClient:
    """One upstream registry. Use as `async with UpstreamClient(url) as upstream:`."""

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 timeouts: Timeouts = Timeouts(), offline_period: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, verify_tls: bool | ssl.SSLContext = True,
                 board: OfflineBoard | None = None):
        self.url = url.rstrip("/")
        self.host = httpx.URL(self.url).host
        self.timeouts = timeouts
        self.offline = OfflineTracker(offline_period, clock)
        self._board = board           # shares the offline state with the site's other nodes
        self._clock = clock
        self._credentials = _Credentials(username, password or "") if username else None
        self._tokens = protocol.TokenCache(clock)
        self._token_locks: dict[str, anyio.Lock] = {}        # one token request per scope at a time
        self._challenge: protocol.Challenge | None = None    # the upstream's last auth challenge
        self._http = httpx.AsyncClient(timeout=timeouts.httpx(), verify=verify_tls, follow_redirects=False,
                                       headers={"User-Agent": "cargohold-upstream"})

    def __repr__(self) -> str:
        return f"UpstreamClient({self.url!r}, credentials={'yes' if self._credentials else 'no'})"

    async def __aenter__(self) -> "UpstreamClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def repository(self, name: str) -> str:
        """The upstream's name for `name` (Docker Hub: `alpine` is `library/alpine`)."""
        return protocol.upstream_repository(self.host, name)

    # -- calls ----------------------------------------------------------------------
    async def head_manifest(self, repository: str, reference: str,
                            accept: str = ACCEPT_MANIFESTS) -> ManifestHead | None:
        """Digest, media type and size of a manifest without fetching it (Docker Hub does not count
        a HEAD as a pull); None if the upstream has no such manifest."""
        try:
            with self._bounded(f"HEAD manifest {repository}:{reference}"):
                response = await self._call("HEAD", repository, self._url(repository, f"manifests/{reference}"),
                                            {"Accept": accept})
        except errors.UpstreamNotFound:
            return None
        announced = response.headers.get("docker-content-digest") or (reference if is_digest(reference) else None)
        if announced is None:   # some registries only say it on GET
            body, media_type, digest = await self.get_manifest(repository, reference, accept)
            return ManifestHead(digest, media_type, len(body))
        return ManifestHead(announced, _media_type(response), int(response.headers.get("content-length", 0)))

    async def get_manifest(self, repository: str, reference: str,
                           accept: str = ACCEPT_MANIFESTS) -> tuple[bytes, str, str]:
        """(exact bytes, media type, digest). The bytes are checked against the upstream's
        `Docker-Content-Digest` and, for a by-digest request, against the digest asked for."""
        what = f"manifest {repository}@{reference}" if is_digest(reference) else f"manifest {repository}:{reference}"
        with self._bounded(what):
            async with self._stream("GET", repository, self._url(repository, f"manifests/{reference}"),
                                    {"Accept": accept}) as response:
                body = await _read_limited(response, MAX_MANIFEST_BYTES, what)
        expected = [reference] if is_digest(reference) else []
        if announced := response.headers.get("docker-content-digest"):
            expected.append(announced)
        digest = await _check_manifest_digest(body, expected, what)
        return body, _media_type(response), digest

    async def has_blob(self, repository: str, digest: str) -> bool:
        """Whether the upstream serves `digest` under `repository` (a HEAD: nothing is fetched)."""
        parse_digest(digest)
        try:
            with self._bounded(f"HEAD blob {repository}@{digest}"):
                await self._call("HEAD", repository, self._url(repository, f"blobs/{digest}"))
        except errors.UpstreamNotFound:
            return False
        return True

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str) -> AsyncIterator["BlobChunks"]:
        """`async with upstream.stream_blob(repo, digest) as chunks: async for chunk in chunks`.
        Follows redirects (Distribution on S3 answers 307); the caller checks the digest as it goes
        (`verify.verified`). A read that stalls longer than `timeouts.read` raises UpstreamUnavailable.
        `chunks.size` is the size the upstream announced (Content-Length), None if it did not."""
        parse_digest(digest)
        async with self._stream("GET", repository, self._url(repository, f"blobs/{digest}"),
                                {"Accept-Encoding": "identity"}, follow_redirects=True) as response:
            async with aclosing(self._chunks(response, f"blob {repository}@{digest}")) as chunks:
                yield BlobChunks(chunks, _content_length(response))

    async def tags(self, repository: str, page_size: int | None = None) -> list[str]:
        """Every tag of `repository`, following `Link` pagination."""
        tags: list[str] = []
        url = self._url(repository, f"tags/list?n={page_size}" if page_size else "tags/list")
        with self._bounded(f"tags of {repository}"):
            for _ in range(MAX_TAG_PAGES):
                response = await self._call("GET", repository, url)
                tags += _tag_page(response, repository)
                url = protocol.next_page(response.headers.get("link"), str(response.url))
                if url is None:
                    return tags
                if not url.startswith(f"{self.url}/v2/"):    # never carry our credentials elsewhere
                    raise errors.UpstreamError(f"tags of {repository}: next page is on another registry")
        raise errors.UpstreamError(f"tags of {repository}: more than {MAX_TAG_PAGES} pages")

    # -- requests with auth and classification -----------------------------------------
    @contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        """Bound a whole non-streaming call by `timeouts.total`, however the upstream dribbles."""
        try:
            with anyio.fail_after(self.timeouts.total):
                yield
        except TimeoutError:
            raise self._unavailable(f"{what}: no complete answer within {self.timeouts.total:g}s") from None

    def _url(self, repository: str, path: str) -> str:
        return f"{self.url}/v2/{self.repository(repository)}/{path}"

    async def _call(self, method: str, repository: str, url: str, headers: dict | None = None) -> httpx.Response:
        async with self._stream(method, repository, url, headers) as response:
            await response.aread()
        return response

    @asynccontextmanager
    async def _stream(self, method: str, repository: str, url: str, headers: dict | None = None, *,
                      follow_redirects: bool = False) -> AsyncIterator[httpx.Response]:
        """Send with auth, retrying once through the auth flow on a 401; yield a successful
        response (body not read yet) or raise the classified error."""
        await self._check_offline()
        scope = protocol.repository_scope(self.repository(repository))
        what = f"{method} {url.removeprefix(self.url).split('?')[0]}"
        try:
            for attempt in (1, 2):
                authorization = await self._authorization(scope, what)
                request = self._http.build_request(method, url, headers={**(headers or {}), **authorization})
                response = await self._send(request, what, follow_redirects)
                try:
                    if response.status_code == 401 and attempt == 1:
                        self._learn_challenge(response, scope, what)
                        continue
                    self._classify(response, what)
                    yield response
                    return
                finally:
                    await response.aclose()
        except errors.UpstreamUnavailable:
            await self._post_offline()
            raise

    async def _check_offline(self) -> None:
        """UpstreamUnavailable at once while this node, or another of its site, found the
        upstream offline less than an offline period ago."""
        self.offline.check()
        if self._board is not None and (posted := await self._board.posted()) is not None:
            self.offline.assume(*posted)
            self.offline.check()

    async def _post_offline(self) -> None:
        """This call found the upstream offline: tell the site's other nodes (best effort)."""
        if self._board is not None and self.offline.offline:
            with anyio.CancelScope(shield=True):
                await self._board.post(self.offline.remaining(), self.offline.reason)

    async def _send(self, request: httpx.Request, what: str, follow_redirects: bool = False) -> httpx.Response:
        try:
            return await self._http.send(request, stream=True, follow_redirects=follow_redirects)
        except httpx.TimeoutException as exc:
            raise self._unavailable(f"{what}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise self._unavailable(f"{what}: {_transport_reason(exc)}") from None

    def _unavailable(self, reason: str) -> errors.UpstreamUnavailable:
        self.offline.failed(reason)
        return errors.UpstreamUnavailable(reason)

    def _classify(self, response: httpx.Response, what: str) -> None:
        failure = protocol.failure_for_status(response.status_code, what, response.headers.get("retry-after"))
        if isinstance(failure, errors.UpstreamUnavailable):
            self.offline.failed(failure.reason, getattr(failure, "retry_after", None))
        else:
            self.offline.succeeded()    # it answered: whatever it said, it is online
        if failure is not None:
            raise failure

    def _learn_challenge(self, response: httpx.Response, scope: str, what: str) -> None:
        """A 401: remember what the upstream asks for; a cached token for this scope is stale."""
        challenge = protocol.parse_challenge(response.headers.get("www-authenticate"))
        if challenge is None or challenge.scheme not in ("bearer", "basic"):
            raise errors.UpstreamDenied(f"{what}: upstream answered 401 without a usable challenge")
        if challenge.scheme == "basic" and self._credentials is None:
            raise errors.UpstreamDenied(f"{what}: upstream wants Basic credentials and none are configured")
        self._challenge = challenge
        self._tokens.forget(scope)

    async def _authorization(self, scope: str, what: str) -> dict[str, str]:
        """The Authorization header for a request in `scope`, as the last challenge asked for."""
        challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            return {"Authorization": self._credentials.header()}
        async with self._token_locks.setdefault(scope, anyio.Lock()):
            token = self._tokens.get(scope)     # concurrent callers wait for the first one's token
            if token is None:
                token = await self._fetch_token(challenge, scope, what)
        return {"Authorization": f"Bearer {token}"}

    async def _fetch_token(self, challenge: protocol.Challenge, scope: str, what: str) -> str:
        if not challenge.realm:
            raise errors.UpstreamDenied(f"{what}: Bearer challenge without a realm")
        headers = {"Authorization": self._credentials.header()} if self._credentials else {}
        asked_at = self._clock()
        request = self._http.build_request("GET", challenge.realm, params=protocol.token_query(challenge, scope),
                                           headers=headers)
        response = await self._send(request, f"token for {scope}")
        try:
            self._classify(response, f"token for {scope}")
            body = await _read_limited(response, MAX_TOKEN_RESPONSE_BYTES, f"token for {scope}")
        finally:
            await response.aclose()
        try:
            document = json.loads(body)
        except ValueError:
            raise errors.UpstreamDenied(f"token for {scope}: answer is not JSON") from None
        token, lifetime = protocol.token_from_response(document)
        self._tokens.put(scope, token, lifetime, asked_at)
        return token

    async def _chunks(self, response: httpx.Response, what: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.TimeoutException:
            raise self._unavailable(f"{what}: read timed out mid-stream") from None
        except httpx.TransportError as exc:
            raise self._unavailable(f"{what}: {_transport_reason(exc)} mid-stream") from None


class BlobChunks:
    """A blob's chunks as they arrive, and the size the upstream announced for them."""

    def __init__(self, chunks: AsyncIterator[bytes], size: int | None):
        self._chunks = chunks
        self.size = size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks


def _content_length(response: httpx.Response) -> int | None:
    text = response.headers.get("content-length", "")
    return int(text) if text.isdigit() else None


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def _tag_page(response: httpx.Response, repository: str) -> list[str]:
    try:
        tags = response.json().get("tags") or []
    except (ValueError, AttributeError):
        raise errors.UpstreamError(f"tags of {repository}: answer is not a tag list") from None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise errors.UpstreamError(f"tags of {repository}: answer is not a tag list")
    return tags


async def _read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body, refusing more than `limit` bytes (a manifest or token is small)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise errors.UpstreamError(f"{what}: answer larger than {limit} bytes")
    return bytes(body)


async def _check_manifest_digest(body: bytes, expected: list[str], what: str) -> str:
    """The manifest's digest: every digest in `expected` must match the bytes; with none, sha256."""
    for text in expected:
        try:
            wanted = parse_digest(text)
        except RegistryError:
            raise errors.DigestMismatch(f"{what}: upstream announced a malformed digest") from None
        hasher = wanted.hasher()
        await hash_chunk(hasher, body)
        if hasher.hexdigest() != wanted.hex:
            raise errors.DigestMismatch(f"{what}: bytes do not hash to {wanted}")
    if expected:
        return expected[0]
    hasher = hashlib.sha256()
    await hash_chunk(hasher, body)
    return f"sha256:{hasher.hexdigest()}"


def _transport_reason(exc: httpx.TransportError) -> str:
    """A short reason: the exception's class and the OS's or TLS library's words (httpx puts no
    URL or header in them, so no credential can leak)."""
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
