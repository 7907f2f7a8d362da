"""The async etcd v3 adapter: the only module of cargohold that talks to etcd.

It uses pyetcd (``etcd-sdk-python``) for its generated protobuf messages and gRPC stubs
only, and builds its own grpcio channels (no endpoint blacklisting, short reconnect
back-off). Everything here is written against anyio and works on trio and asyncio.

How blocking grpcio is kept off the event loop (helpers in ``cargohold.runtime.grpc_bridge``):

* unary calls (Range, Put, DeleteRange, Txn, LeaseGrant, LeaseRevoke) use
  ``multicallable.future()``; the future's done-callback (run on a grpc thread) schedules
  ``event.set`` on the loop with the loop's own thread-safe, non-blocking scheduler
  (``loop.call_soon_threadsafe`` / ``TrioToken.run_sync_soon``), and a cancelled waiter
  cancels the future. No thread is used per call.
* streams (Watch, LeaseKeepAlive) read their next message with ``next(call)`` in an
  anyio worker thread under a private ``CapacityLimiter`` (so they never take tokens
  from the default limiter that file I/O uses); a cancelled reader cancels the call,
  which wakes that thread at once.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with a short back-off,
rotating over the endpoints, for up to ``retry_timeout`` seconds, then ``EtcdUnavailable``
is raised. A Txn is only retried when the failure shows the request never reached etcd,
because re-running a txn that did commit would report the wrong outcome; otherwise the
caller gets ``EtcdUnavailable`` and must treat the outcome as unknown.

Failing fast during an outage (``EtcdHealth``): once requests have been failing as
unavailable for ``outage_after`` seconds (2 s), etcd counts as down, and a request fails at
once with ``EtcdUnavailable`` instead of retrying for ``retry_timeout``; one request a second
still goes through, as a single short attempt, to find out whether etcd is back. Any answer
from etcd, to a request or on a stream (the watch re-subscribes and the lease keepalive
retries throughout an outage, so they notice first), ends the outage. Background streams
(watch, lease keepalive) are never failed fast.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from cargohold.runtime.durations import DurationHistogram
from cargohold.runtime.grpc_bridge import await_future, next_message

__all__ = [
    "Compare",
    "Delete",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdHealth",
    "EtcdUnavailable",
    "Get",
    "KeyValue",
    "LeaseLost",
    "Put",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "WatchEvent",
]

_T = TypeVar("_T")


# --------------------------------------------------------------------------- errors


class EtcdError(Exception):
    """Any failure talking to etcd."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached within the retry budget (or a write's outcome is unknown)."""


class EtcdCompacted(EtcdError):
    """The requested revision is no longer in etcd's history.

    ``revision`` is etcd's compact revision when etcd says it (watches); for a read at a
    revision it is the revision that was asked for.
    """

    def __init__(self, revision: int, message: str | None = None) -> None:
        self.revision = revision
        super().__init__(message or f"etcd history compacted (revision {revision})")


class LeaseLost(EtcdError):
    """The lease is gone (expired, revoked, or not refreshable within its TTL)."""


# --------------------------------------------------------------------------- health

# Seconds requests may keep failing as unavailable before etcd counts as down. Long enough to
# ride out a leader election (well under a second), short enough that a push during a real
# outage gets its 503 within a few seconds.
OUTAGE_AFTER = 2.0
# While etcd is down: how often one request may try it, and how long that attempt may take.
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0


class EtcdHealth:
    """Whether etcd answers, as this client's requests and streams saw it (no I/O).

    ``failing_since`` is set by the first failure after an answer and cleared by the next
    answer; etcd is *down* once failures have gone on for ``outage_after`` seconds.
    """

    def __init__(self, outage_after: float = OUTAGE_AFTER, probe_interval: float = PROBE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.outage_after = outage_after
        self.probe_interval = probe_interval
        self._clock = clock
        self.last_answer = clock()
        self.failing_since: float | None = None
        self.outages = 0                  # times etcd went down (for /metrics)
        self._last_probe = float("-inf")
        self._counted = False

    def answered(self) -> None:
        self.last_answer = self._clock()
        self.failing_since = None
        self._counted = False

    def failed(self) -> None:
        if self.failing_since is None:
            self.failing_since = self._clock()

    @property
    def reachable(self) -> bool:
        """No request or stream has failed since etcd last answered."""
        return self.failing_since is None

    @property
    def down(self) -> bool:
        """Failures have gone on for `outage_after` seconds (the first look counts the outage)."""
        if self.failing_since is None or self._clock() - self.failing_since < self.outage_after:
            return False
        if not self._counted:
            self._counted = True
            self.outages += 1
        return True

    def until_down(self) -> float:
        """Seconds until failures going on now make etcd count as down (inf while it answers)."""
        if self.failing_since is None:
            return float("inf")
        return max(self.failing_since + self.outage_after - self._clock(), 0.0)

    def unreachable_for(self) -> float:
        """Seconds since etcd last answered, while it is not answering; 0 while it is."""
        return 0.0 if self.failing_since is None else self._clock() - self.last_answer

    def take_probe(self) -> bool:
        """While down: whether this request may try etcd (one a `probe_interval`)."""
        now = self._clock()
        if now - self._last_probe < self.probe_interval:
            return False
        self._last_probe = now
        return True


# --------------------------------------------------------------------------- data


def _enc(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for a prefix: the prefix with its last byte + 1 ("\\0" = all keys)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _earlier_end(a: bytes, b: bytes) -> bytes:
    """The nearer of two range ends (b"\\0" is etcd's "to the last key")."""
    if a == b"\0":
        return b
    if b == b"\0":
        return a
    return min(a, b)


class _KeyDensity:
    """Where about a page of keys ends, learnt from the last full page.

    A key's position is the 8 bytes after the prefix the page's keys share, read as a number;
    the page spanned `span` positions, so the next page probably spans as many.
    """

    WIDTH = 8
    LIMIT = 1 << (8 * WIDTH)

    def __init__(self, shared: bytes, span: int):
        self.shared = shared
        self.span = max(span, 1)

    @classmethod
    def of_page(cls, first: bytes, last: bytes) -> "_KeyDensity":
        shared = _common_prefix(first, last)
        estimate = cls(shared, 0)
        estimate.span = max(estimate._position(last) - estimate._position(first), 1)
        return estimate

    def _position(self, key: bytes) -> int:
        return int.from_bytes(key[len(self.shared):len(self.shared) + self.WIDTH].ljust(self.WIDTH, b"\0"), "big")

    def end_after(self, start: bytes) -> bytes:
        while self.shared and not start.startswith(self.shared):
            # Past the shared prefix: measure one level up, where a position is 256 times wider.
            self.shared = self.shared[:-1]
            self.span = max(self.span >> 8, 1)
        position = self._position(start) + self.span
        if position >= self.LIMIT:
            return _prefix_end(self.shared) if self.shared else b"\0"
        return self.shared + position.to_bytes(self.WIDTH, "big").rstrip(b"\0")

    def widen(self, factor: int) -> None:
        self.span = min(self.span * factor, self.LIMIT)


def _common_prefix(a: bytes, b: bytes) -> bytes:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def _from_pb(cls, kv: Any) -> KeyValue:
        return cls(_dec(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # "put" or "delete"
    key: str
    value: bytes  # b"" for delete
    mod_revision: int

    @classmethod
    def _from_pb(cls, event: Any) -> WatchEvent:
        kind = "delete" if event.type == kv_pb2.Event.DELETE else "put"
        return cls(kind, _dec(event.kv.key), event.kv.value, event.kv.mod_revision)


@dataclass(frozen=True)
class WatchBatch:
    revision: int  # last event's mod_revision, or the progress revision when events == []
    events: list[WatchEvent]


_CMP_RESULTS = {
    "==": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}
# target name -> (protobuf enum, name of the oneof field holding the operand)
_CMP_TARGETS = {
    "create": (etcdrpc.Compare.CREATE, "create_revision"),
    "mod": (etcdrpc.Compare.MOD, "mod_revision"),
    "version": (etcdrpc.Compare.VERSION, "version"),
    "value": (etcdrpc.Compare.VALUE, "value"),
}


@dataclass(frozen=True)
class Compare:
    """One txn guard; build it with the classmethods."""

    key: str
    target: str  # "create" | "mod" | "version" | "value"
    result: str  # "==" | "!=" | "<" | ">"
    operand: int | bytes
    prefix: bool = False  # compare every key under `key` (true for an empty range)

    @classmethod
    def none_with_prefix(cls, prefix: str) -> Compare:
        """No key starts with `prefix` (etcd compares an empty range as one absent key)."""
        return cls(prefix, "create", "==", 0, prefix=True)

    @classmethod
    def exists(cls, key: str) -> Compare:
        return cls(key, "create", ">", 0)

    @classmethod
    def missing(cls, key: str) -> Compare:
        return cls(key, "create", "==", 0)

    @classmethod
    def value_equals(cls, key: str, value: bytes) -> Compare:
        return cls(key, "value", "==", bytes(value))

    @classmethod
    def mod_revision_equals(cls, key: str, revision: int) -> Compare:
        return cls(key, "mod", "==", int(revision))

    @classmethod
    def unchanged_since(cls, prefix: str, revision: int) -> Compare:
        """No key under `prefix` was created or changed after `revision` (true for an empty range;
        a key deleted since is not seen, which is what a guard on "nothing new appeared" wants)."""
        return cls(prefix, "mod", "<", int(revision) + 1, prefix=True)

    def _to_pb(self) -> Any:
        target, field = _CMP_TARGETS[self.target]
        pb = etcdrpc.Compare(key=_enc(self.key), result=_CMP_RESULTS[self.result], target=target)
        if self.prefix:
            pb.range_end = _prefix_end(_enc(self.key))
        setattr(pb, field, self.operand)
        return pb


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list  # per op: Get -> list[KeyValue], Put -> None, Delete -> int


def _range_request(key: str, *, prefix: bool = False, start_key: str | None = None, **fields: Any) -> Any:
    raw = _enc(key)
    req = etcdrpc.RangeRequest(key=raw, **fields)
    if prefix:
        req.range_end = _prefix_end(raw)
        if start_key is not None:
            req.key = max(raw, _enc(start_key))
    return req


def _delete_request(key: str, prefix: bool) -> Any:
    raw = _enc(key)
    return etcdrpc.DeleteRangeRequest(key=raw, range_end=_prefix_end(raw) if prefix else b"")


def _op_to_pb(op: Put | Delete | Get) -> Any:
    if isinstance(op, Put):
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=_enc(op.key), value=bytes(op.value), lease=op.lease)
        )
    if isinstance(op, Delete):
        return etcdrpc.RequestOp(request_delete_range=_delete_request(op.key, op.prefix))
    if isinstance(op, Get):
        return etcdrpc.RequestOp(request_range=_range_request(op.key, prefix=op.prefix))
    raise TypeError(f"not a txn operation: {op!r}")


def _op_result(resp: Any) -> list[KeyValue] | int | None:
    kind = resp.WhichOneof("response")
    if kind == "response_range":
        return [KeyValue._from_pb(kv) for kv in resp.response_range.kvs]
    if kind == "response_delete_range":
        return resp.response_delete_range.deleted
    return None


# --------------------------------------------------------------------------- grpc plumbing

_MiB = 1024 * 1024
_CHANNEL_OPTIONS = [
    # Reconnect quickly after etcd restarts (grpc's default back-off grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Notice a dead peer under long-lived streams; etcd's default minimum ping interval is
    # 5 s and it refuses pings without open streams, so stay above it and within calls.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 256 * _MiB),
    ("grpc.max_send_message_length", 16 * _MiB),
]
# Streams on a member that has lost its leader are failed by etcd (instead of going
# silent), so watches and keepalives move to another endpoint.
_REQUIRE_LEADER = (("hasleader", "true"),)
# Seconds: a healthy local etcd answers in under a millisecond; retries stop after retry_timeout.
REQUEST_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Failure texts meaning the request was never processed: safe to retry any write.
_NOT_SENT = ("failed to connect", "connection refused", "no leader")
_PERMANENT_FOR_WATCH = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
)


def _details(err: grpc.RpcError) -> str:
    try:
        return err.details() or ""
    except Exception:  # pragma: no cover - not every RpcError is a Call
        return str(err)


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return err.code()
    except Exception:  # pragma: no cover
        return None


def _is_transient(err: grpc.RpcError, idempotent: bool) -> bool:
    code = _code(err)
    if code not in _TRANSIENT:
        return False
    if idempotent:
        return True
    details = _details(err).lower()
    return code == grpc.StatusCode.UNAVAILABLE and any(text in details for text in _NOT_SENT)


def _translate(err: grpc.RpcError, what: str, revision: int = 0) -> EtcdError:
    code, details = _code(err), _details(err)
    message = f"etcd {what}: {code.name if code else 'error'}: {details}"
    if code in _TRANSIENT:
        return EtcdUnavailable(message)
    if "compacted" in details:
        return EtcdCompacted(revision, message)
    if "lease not found" in details:
        return LeaseLost(message)
    return EtcdError(message)


class _Backoff:
    def __init__(self, first: float = 0.05, cap: float = 1.0) -> None:
        self._delay = first
        self._cap = cap

    def next(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, self._cap)
        return delay * random.uniform(0.8, 1.2)


class _Endpoint:
    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.target = target
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)


def _parse_endpoint(url: str, tls_by_default: bool) -> tuple[str, bool]:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rstrip("/"), tls_by_default
    if scheme == "unix":          # a private etcd's socket (coordinator/embedded.py): grpc dials unix:PATH
        return f"unix:{rest}", False
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported etcd endpoint scheme: {url!r}")
    return rest.rstrip("/"), scheme == "https"


# --------------------------------------------------------------------------- client


class EtcdClient:
    def __init__(
        self,
        endpoints: list[str],
        *,
        request_timeout: float = 5.0,
        retry_timeout: float = 10.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        outage_after: float = OUTAGE_AFTER,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        self._request_timeout = request_timeout
        self._retry_timeout = retry_timeout
        tls_files = [ca_file, key_file, cert_file]
        credentials = None
        parsed = [_parse_endpoint(url, any(tls_files)) for url in endpoints]
        if any(tls for _, tls in parsed):
            ca, key, cert = (Path(p).read_bytes() if p else None for p in tls_files)
            credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self._endpoints = [_Endpoint(target, credentials if tls else None) for target, tls in parsed]
        self._current = random.randrange(len(self._endpoints))
        self._closed = False
        self.health = EtcdHealth(outage_after)
        # Every unary round trip (including retries) and its duration, for /metrics.
        self.request_durations = DurationHistogram(REQUEST_DURATION_BUCKETS)
        self.lease_refreshes = 0       # of which lease keepalives (background, every ttl/3)

    @property
    def requests(self) -> int:
        return self.request_durations.count

    @property
    def request_seconds(self) -> float:
        return self.request_durations.sum

    # -- lifecycle

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_channels)

    def _close_channels(self) -> None:
        for endpoint in self._endpoints:
            endpoint.channel.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- retry machinery

    def _pick(self) -> _Endpoint:
        if self._closed:
            raise EtcdError("etcd client is closed")
        return self._endpoints[self._current]

    def _failed(self, endpoint: _Endpoint) -> None:
        if self._endpoints[self._current] is endpoint:
            self._current = (self._current + 1) % len(self._endpoints)

    async def _retrying(
        self,
        attempt: Callable[[_Endpoint], Awaitable[_T]],
        what: str,
        *,
        idempotent: bool,
        deadline: float | None = None,
        revision: int = 0,
        persistent: bool = False,
    ) -> _T:
        """Run `attempt` until it succeeds, retrying transient failures until `deadline` (or,
        unless `persistent`, until etcd counts as down)."""
        if deadline is None:
            deadline = anyio.current_time() + self._retry_timeout
        backoff = _Backoff()
        while True:
            endpoint = self._pick()
            started = time.perf_counter()
            try:
                result = await attempt(endpoint)
            except grpc.RpcError as err:
                if self._closed:
                    raise EtcdError("etcd client is closed") from err
                self._note_failure(err)
                if not _is_transient(err, idempotent):
                    raise _translate(err, what, revision) from err
                self._failed(endpoint)
                remaining = deadline - anyio.current_time()
                if remaining <= 0 or (self.health.down and not persistent):
                    targets = ", ".join(e.target for e in self._endpoints)
                    raise EtcdUnavailable(f"etcd {what}: no answer from {targets}: {_details(err)}") from err
            else:
                self.health.answered()
                return result
            finally:
                # Every unary round trip, whoever asked for it (for /metrics); the backoff
                # below is not part of the round trip.
                self.request_durations.observe(time.perf_counter() - started)
            # A request that may fail fast wakes when etcd would count as down, to fail then.
            wake_for_outage = float("inf") if persistent else self.health.until_down() + 0.01
            await anyio.sleep(min(backoff.next(), remaining, wake_for_outage))

    def _note_failure(self, err: grpc.RpcError) -> None:
        """A transient failure means etcd did not answer; any other error is etcd's answer."""
        if _code(err) in _TRANSIENT:
            self.health.failed()
        else:
            self.health.answered()

    async def _unary(self, method: str, request: Any, *, idempotent: bool = True, revision: int = 0) -> Any:
        service, name = method.split(".")
        timeout, deadline = self._request_timeout, None
        if self.health.down:
            if not self.health.take_probe():
                raise EtcdUnavailable(f"etcd {name}: etcd has not answered for "
                                      f"{self.health.unreachable_for():.1f} s; not waiting for it")
            timeout, deadline = PROBE_TIMEOUT, anyio.current_time()   # one short attempt: is it back?

        async def attempt(endpoint: _Endpoint) -> Any:
            multicallable = getattr(getattr(endpoint, service), name)
            return await await_future(multicallable.future(request, timeout=timeout))

        return await self._retrying(attempt, name, idempotent=idempotent, revision=revision, deadline=deadline)

    # -- key/value

    async def _range(self, request: Any) -> Any:
        try:
            return await self._unary("kv.Range", request, revision=request.revision)
        except EtcdError as exc:
            # A serializable read at a revision answered by a lagging member: ask the leader.
            if request.serializable and "future revision" in str(exc):
                request.serializable = False
                return await self._unary("kv.Range", request, revision=request.revision)
            raise

    async def get(self, key: str, *, revision: int = 0) -> KeyValue | None:
        resp = await self._range(_range_request(key, revision=revision, serializable=revision > 0))
        return KeyValue._from_pb(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(
        self,
        prefix: str,
        *,
        revision: int = 0,
        limit: int = 0,
        start_key: str | None = None,
        keys_only: bool = False,
    ) -> tuple[list[KeyValue], int, bool]:
        """Keys under ``prefix`` (from ``start_key`` inclusive, when given), sorted by key."""
        request = _range_request(
            prefix,
            prefix=True,
            start_key=start_key,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            serializable=revision > 0,
        )
        resp = await self._range(request)
        return [KeyValue._from_pb(kv) for kv in resp.kvs], resp.header.revision, resp.more

    async def iter_prefix(
        self, prefix: str, *, revision: int = 0, page_size: int = 1000, keys_only: bool = False
    ) -> AsyncIterator[list[KeyValue]]:
        """Pages (of at most ``page_size``) of the keys under ``prefix``, in key order, all read
        at one revision.

        etcd 3.4 walks its index over a range request's whole [key, range_end), however small
        the limit, so paging through a big prefix with one fixed range end costs in proportion
        to what is left on every page: quadratic. Each read here ends instead where the keys
        already seen say about a page lies (`_KeyDensity`: as far past its start as the last
        full page reached past its own), twice as far after a sparse read and 16 times after an
        empty one. Every range starts where the previous one ended, so nothing is skipped or
        read twice.
        """
        start = _enc(prefix)
        end = _prefix_end(start)
        estimate: _KeyDensity | None = None
        while True:
            stop = _earlier_end(end, estimate.end_after(start)) if estimate else end
            request = etcdrpc.RangeRequest(key=start, range_end=stop, revision=revision, limit=page_size,
                                           keys_only=keys_only, serializable=revision > 0)
            resp = await self._range(request)
            revision = revision or resp.header.revision
            if resp.kvs:
                yield [KeyValue._from_pb(kv) for kv in resp.kvs]
            if resp.more and resp.kvs:
                estimate = _KeyDensity.of_page(resp.kvs[0].key, resp.kvs[-1].key)
                start = resp.kvs[-1].key + b"\0"
                continue
            if stop == end:
                return
            start = stop
            if estimate and len(resp.kvs) < page_size // 2:
                estimate.widen(16 if not resp.kvs else 2)

    async def current_revision(self) -> int:
        resp = await self._range(etcdrpc.RangeRequest(key=b"\0", count_only=True))
        return resp.header.revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        resp = await self._unary("kv.Put", etcdrpc.PutRequest(key=_enc(key), value=bytes(value), lease=lease))
        return resp.header.revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); the count may be 0 if a retry repeated it."""
        resp = await self._unary("kv.DeleteRange", _delete_request(key, prefix))
        return resp.deleted

    async def txn(self, compare: list[Compare], success: list, failure: list | None = None) -> TxnResult:
        request = etcdrpc.TxnRequest(
            compare=[c._to_pb() for c in compare],
            success=[_op_to_pb(op) for op in success],
            failure=[_op_to_pb(op) for op in failure or ()],
        )
        resp = await self._unary("kv.Txn", request, idempotent=False)
        return TxnResult(resp.succeeded, resp.header.revision, [_op_result(r) for r in resp.responses])

    # -- leases

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._unary("lease.LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=ttl))
        if resp.error:
            raise EtcdError(f"etcd LeaseGrant: {resp.error}")
        return resp.ID

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease and delete its keys; a lease that is already gone is fine."""
        try:
            await self._unary("lease.LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id))
        except LeaseLost:
            pass

    async def keep_alive(self, lease_id: int, ttl: int) -> None:
        """Refresh the lease every ttl/3 until cancelled.

        Raises ``LeaseLost`` when etcd says the lease is gone, or when no refresh got
        through for ``ttl`` seconds (the lease must then be assumed expired).
        """
        limiter = anyio.CapacityLimiter(1)
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

        async def attempt(endpoint: _Endpoint) -> Any:
            self.lease_refreshes += 1
            call = endpoint.lease.LeaseKeepAlive(
                iter([request]), timeout=self._request_timeout, metadata=_REQUIRE_LEADER
            )
            try:
                return await next_message(call, limiter)
            finally:
                call.cancel()

        refreshed_at = anyio.current_time()
        while True:
            started = anyio.current_time()
            try:
                resp = await self._retrying(
                    attempt, "LeaseKeepAlive", idempotent=True, deadline=refreshed_at + ttl, persistent=True
                )
            except EtcdUnavailable as exc:
                raise LeaseLost(f"lease {lease_id:x} not refreshed for {ttl} s: {exc}") from exc
            if resp is None or resp.TTL <= 0:
                raise LeaseLost(f"lease {lease_id:x} expired or revoked")
            refreshed_at = started
            await anyio.sleep(max(min(ttl, resp.TTL) / 3, 0.1))

    # -- watches

    def watch_prefix(self, prefix: str, *, start_revision: int) -> Watch:
        return Watch(self, prefix, start_revision)


class Watch:
    """A resumable watch on a prefix; see ``EtcdClient.watch_prefix``.

    Each batch is read from etcd only when the consumer asks for it (etcd's flow control
    does the buffering). When the stream breaks the watch re-subscribes from the revision
    after the last batch it returned, retrying with back-off for as long as etcd is away.
    ``revision`` of a batch is its last event's mod_revision, or for a progress batch
    (``events == []``) a revision up to which every event has been delivered.
    """

    def __init__(self, client: EtcdClient, prefix: str, start_revision: int) -> None:
        self._client = client
        raw = _enc(prefix)
        self._create = etcdrpc.WatchCreateRequest(key=raw, range_end=_prefix_end(raw), progress_notify=True)
        self._next_revision = start_revision
        self._call: Any = None
        self._endpoint: _Endpoint | None = None
        self._stream_done: threading.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._error: EtcdError | None = None
        self._closed = False

    async def __aenter__(self) -> Watch:
        if self._next_revision <= 0:  # "from now": pin it, so that resuming starts there
            self._next_revision = await self._client.current_revision() + 1
        self._limiter = anyio.CapacityLimiter(1)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        self._drop_stream()

    def __aiter__(self) -> Watch:
        return self

    def _subscribe(self) -> None:
        self._endpoint = self._client._pick()
        self._create.start_revision = self._next_revision
        create = etcdrpc.WatchRequest(create_request=self._create)
        done = self._stream_done = threading.Event()

        def requests() -> Iterator[Any]:
            # Keep our side of the stream open until the stream is dropped; grpc reads
            # this iterator in a thread of its own, which ends when ``done`` is set.
            yield create
            done.wait()

        self._call = self._endpoint.watch.Watch(requests(), metadata=_REQUIRE_LEADER)

    def _drop_stream(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._stream_done is not None:
            self._stream_done.set()
            self._stream_done = None

    def _fail(self, error: EtcdError) -> EtcdError:
        self._drop_stream()
        self._error = error
        return error

    async def __anext__(self) -> WatchBatch:
        if self._error is not None:
            raise self._error
        if self._closed or self._limiter is None:
            raise StopAsyncIteration
        backoff = _Backoff()
        while True:
            if self._call is None:
                self._subscribe()
            try:
                resp = await next_message(self._call, self._limiter)
            except grpc.RpcError as err:
                self._drop_stream()
                self._client._note_failure(err)
                if self._client._closed or _code(err) in _PERMANENT_FOR_WATCH:
                    raise self._fail(_translate(err, "Watch")) from err
                self._client._failed(self._endpoint)
                await anyio.sleep(backoff.next())
                continue
            except BaseException:
                self._drop_stream()  # re-subscribed on the next call: nothing is lost
                raise
            if resp is None:  # the server ended the stream: subscribe again
                self._drop_stream()
                continue
            self._client.health.answered()
            batch = self._batch(resp)
            if batch is not None:
                return batch

    def _batch(self, resp: Any) -> WatchBatch | None:
        if resp.compact_revision:
            raise self._fail(EtcdCompacted(resp.compact_revision))
        if resp.canceled:
            raise self._fail(EtcdError(f"etcd cancelled the watch: {resp.cancel_reason}"))
        if resp.created:
            return None
        if resp.events:
            events = [WatchEvent._from_pb(e) for e in resp.events if e.kv.mod_revision >= self._next_revision]
            if not events:
                return None
            revision = events[-1].mod_revision
        else:
            revision = resp.header.revision
            if revision < self._next_revision:
                return None
            events = []
        self._next_revision = revision + 1
        return WatchBatch(revision, events)
