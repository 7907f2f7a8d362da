"""Blob transfer between nodes over gRPC: the servicer every node runs, and the client side.

The server is grpcio's thread-pool server: each open stream holds one pool thread that reads
the file and yields chunks, so the pool is sized for the concurrent streams it must carry.
A `FollowFill` stream holds its thread for as long as the fill it follows lasts (and as long as
a slow follower takes to read it): at most MAX_FOLLOWERS of them run at once, so that the rest
of the pool always serves replication.
The client side bridges grpc calls into anyio tasks (cargohold.runtime.grpc_bridge): awaiting never
blocks the loop, and cancelling the awaiting task cancels the call.

Every call carries the cluster's peer credential (`cargohold.auth.peer`: an HMAC of the method
and the time) and the server's interceptor refuses any call without a valid one, UNAUTHENTICATED,
before a handler runs: the port serves blobs to the cluster's nodes only, whatever address it
listens on, with or without mutual TLS.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, BinaryIO, Callable, Iterator, Protocol

import anyio
import grpc

from cargohold.auth.peer import METADATA_KEY, PeerSecrets, check, sign
from cargohold.runtime.grpc_bridge import await_future, consume_stream, next_message
from cargohold.replication.v1 import replication_pb2 as pb
from cargohold.replication.v1 import replication_pb2_grpc as pb_grpc

log = logging.getLogger("cargohold.replication")

CHUNK_SIZE = 1024 * 1024
MAX_BLOBS_PER_CALL = 256
MAX_FOLLOWERS = 8          # FollowFill streams at once (of the pool's 32 threads by default)
FOLLOW_WAKE = 1.0          # how often a FollowFill stream waiting for its fill checks its peer is there
STALL_TIMEOUT = 30.0       # a followed fill that makes no progress this long ends the stream
FILL_START_WAIT = 5.0      # how long FollowFill waits for the fill's upstream response to start
FOLLOW_START_TIMEOUT = 10.0    # how long a follower waits for the size (connecting included)
_OPTIONS = [
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # a peer that restarted is reachable again within 2 s, not after grpc's backoff of up to 2 min
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

OpenBlob = Callable[[str], "BinaryIO | None"]
Keyring = Callable[[], PeerSecrets]      # the peer secrets in force now (they rotate)
_SERVICE = "/" + pb.DESCRIPTOR.services_by_name["Replication"].full_name + "/"


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS between nodes: this node's certificate and key, and the CA that signs peers'."""
    cert: str
    key: str
    ca: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()


class PeerUnavailable(Exception):
    """The peer could not be reached or does not hold the blob (`code`: the call's status, if it failed)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def _failed(address: str, exc: grpc.RpcError) -> PeerUnavailable:
    return PeerUnavailable(f"{address}: {exc.code().name} {exc.details()}", exc.code())


class FillNotFollowed(PeerUnavailable):
    """The peer has no fill of the blob to follow (NOT_FOUND), or no room for another follower."""


class FillTail(Protocol):
    """A fill in progress on this node, read on a grpc pool thread (pullthrough.staging.FillTail)."""
    size: int

    def readable(self, position: int, timeout: float) -> int:
        """How far it may be read, waiting up to `timeout` for more than `position`; raises the fill's error."""

    def read(self, position: int, end: int) -> bytes: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


# `open_fill(digest, timeout)`, called on a pool thread: the fill of `digest` in progress here
# (waiting up to `timeout` for its upstream response to start), or None.
OpenFill = Callable[[str, float], "FillTail | None"]


class ReplicationService(pb_grpc.ReplicationServicer):
    """Serves this node's blobs to peers. `open_blob(digest)` returns an open file or None;
    `open_fill`, set once the node's pull-through filler runs, the fills peers may follow."""

    def __init__(self, open_blob: OpenBlob, is_valid_digest: Callable[[str], bool], *,
                 open_fill: OpenFill | None = None, stall_timeout: float = STALL_TIMEOUT,
                 max_followers: int = MAX_FOLLOWERS):
        self._open = open_blob
        self._valid = is_valid_digest
        self.open_fill = open_fill
        self.stall_timeout = stall_timeout
        self.max_followers = max_followers
        self.followers = 0            # FollowFill streams open now
        self._lock = threading.Lock()

    def _file(self, digest: str, context) -> BinaryIO | None:
        if not self._valid(digest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid digest {digest[:80]!r}")
        return self._open(digest)

    def ReadBlob(self, request, context):
        f = self._file(request.digest, context)
        if f is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.digest} is not held here")
        with f:
            for offset, data in _chunks(f, request.offset, request.length or None, context):
                yield pb.BlobChunk(offset=offset, data=data)

    def ReadBlobs(self, request, context):
        digests = list(request.digests)
        if len(digests) > MAX_BLOBS_PER_CALL:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(digests)} digests: at most {MAX_BLOBS_PER_CALL}")
        for digest in digests:
            if not self._valid(digest):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid digest {digest[:80]!r}")
        for index, digest in enumerate(digests):
            if not context.is_active():
                return
            f = self._open(digest)
            if f is None:
                yield pb.BlobsChunk(index=index, missing=True)
                continue
            with f:
                for offset, data in _chunks(f, 0, None, context):
                    yield pb.BlobsChunk(index=index, offset=offset, data=data)

    def StatBlob(self, request, context):
        f = self._file(request.digest, context)
        if f is None:
            return pb.StatBlobResponse(present=False, size=0)
        with f:
            f.seek(0, 2)
            return pb.StatBlobResponse(present=True, size=f.tell())

    def FollowFill(self, request, context):
        if not self._valid(request.digest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid digest {request.digest[:80]!r}")
        if not self._admit_follower():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this node serves as many fill followers as it allows")
        try:
            tail = self.open_fill(request.digest, FILL_START_WAIT) if self.open_fill is not None else None
            if tail is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no fill of {request.digest} streams here")
            try:
                if not 0 <= request.offset <= tail.size:
                    context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} of {tail.size} bytes")
                context.add_callback(tail.wake)
                yield pb.FillChunk(size=tail.size)
                yield from self._released(tail, request.offset, context)
            finally:
                tail.close()
        finally:
            with self._lock:
                self.followers -= 1

    def _admit_follower(self) -> bool:
        with self._lock:
            if self.followers >= self.max_followers:
                return False
            self.followers += 1
            return True

    def _released(self, tail: FillTail, position: int, context) -> Iterator[pb.FillChunk]:
        """The fill's bytes from `position` as they are released, while the peer is there; the
        fill's failure or a fill that stalls aborts the call (the peer's body then ends short)."""
        progressed = time.monotonic()
        while position < tail.size and context.is_active():
            try:
                readable = tail.readable(position, FOLLOW_WAKE)
            except Exception as exc:   # noqa: BLE001 - the fill's failure, whatever it was
                context.abort(grpc.StatusCode.ABORTED, f"the fill failed: {exc}")
            if readable > position:
                data = tail.read(position, readable)
                yield pb.FillChunk(offset=position, data=data)
                position += len(data)
                progressed = time.monotonic()
            elif time.monotonic() - progressed > self.stall_timeout:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the fill made no progress for {self.stall_timeout:g}s")


def _chunks(f: BinaryIO, offset: int, remaining: int | None, context) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pieces of an open blob from `offset`, `remaining` bytes (None: to the end),
    while the call is active."""
    f.seek(offset)
    while context.is_active():
        want = CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining)
        if want <= 0:
            return
        data = f.read(want)
        if not data:
            return
        yield offset, data
        offset += len(data)
        if remaining is not None:
            remaining -= len(data)


class PeerCheck(grpc.ServerInterceptor):
    """Refuses every call without a valid peer credential, UNAUTHENTICATED, before its handler
    runs; an unknown method too, so a stranger learns nothing. Runs on grpc's threads: the
    check is a few HMACs of a short string, and `keyring` an attribute read."""

    def __init__(self, keyring: Keyring):
        self._keyring = keyring
        self._refusals = _RefusalLog()

    def intercept_service(self, continuation, details):
        value = next((m.value for m in details.invocation_metadata or () if m.key == METADATA_KEY), None)
        reason = check(value, details.method, self._keyring(), time.time())
        handler = continuation(details)           # only looks the handler up: nothing of it runs
        if reason is None:
            return handler
        return _refusal(handler, reason, self._refusals)


_HANDLER_SHAPES = {(False, False): grpc.unary_unary_rpc_method_handler,
                   (False, True): grpc.unary_stream_rpc_method_handler,
                   (True, False): grpc.stream_unary_rpc_method_handler,
                   (True, True): grpc.stream_stream_rpc_method_handler}


def _refusal(handler, reason: str, refusals: "_RefusalLog"):
    """A handler of the refused method's shape that only answers UNAUTHENTICATED."""
    def refuse(request, context):
        refusals.note(context.peer(), reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    shape = (handler.request_streaming, handler.response_streaming) if handler is not None else (False, False)
    return _HANDLER_SHAPES[shape](refuse)


class _RefusalLog:
    """At most one warning a minute about refused calls: a port scanner, or a node of an older
    version that sends no credential, must not flood the log."""
    INTERVAL = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._next = 0.0
        self._quiet = 0

    def note(self, peer: str, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._quiet += 1
                return
            self._next, quiet, self._quiet = now + self.INTERVAL, self._quiet, 0
        log.warning("refused a gRPC call from %s: %s%s", peer, reason,
                    f" ({quiet} more refused since the last warning)" if quiet else "")


@asynccontextmanager
async def grpc_server(address: str, service: ReplicationService, max_streams: int = 32,
                      tls: TlsFiles | None = None, *, keyring: Keyring | None) -> AsyncIterator[int]:
    """Run the replication server on `address`; yields the bound port. Every call must carry a
    credential signed with one of `keyring()`'s secrets; None checks nothing (`--grpc-insecure`,
    so required here: an open port is never the default). With `tls`, peers must also present a
    certificate signed by the CA."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="grpc-repl"),
                         options=_OPTIONS, maximum_concurrent_rpcs=max_streams * 4,
                         interceptors=[] if keyring is None else [PeerCheck(keyring)])
    pb_grpc.add_ReplicationServicer_to_server(service, server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        cert, key, ca = tls.read()
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind the gRPC server to {address}")
    server.start()
    try:
        yield port
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: server.stop(grace=1).wait())


class PeerClient:
    """Client side of the replication service, one channel per peer address. Each call is signed
    with `keyring()`'s newest secret (without a keyring, calls carry no credential)."""

    def __init__(self, max_streams: int = 16, tls: TlsFiles | None = None, keyring: Keyring | None = None):
        self._keyring = keyring
        self._credentials = None
        if tls is not None:
            cert, key, ca = tls.read()
            self._credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                             certificate_chain=cert)
        self._stubs: dict[str, pb_grpc.ReplicationStub] = {}
        self._channels: list[grpc.Channel] = []
        self._readers = anyio.CapacityLimiter(max_streams)

    def _stub(self, address: str) -> pb_grpc.ReplicationStub:
        stub = self._stubs.get(address)
        if stub is None:
            if self._credentials is None:
                channel = grpc.insecure_channel(address, options=_OPTIONS)
            else:
                channel = grpc.secure_channel(address, self._credentials, options=_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.ReplicationStub(channel)
        return stub

    def _signed(self, method: str) -> tuple[tuple[str, str], ...] | None:
        """The call metadata that authenticates one call of `method`, signed now."""
        if self._keyring is None:
            return None
        return ((METADATA_KEY, sign(self._keyring().signing, _SERVICE + method, time.time())),)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._stubs.clear()

    async def stat(self, address: str, digest: str, timeout: float = 5.0) -> int | None:
        future = self._stub(address).StatBlob.future(pb.StatBlobRequest(digest=digest), timeout=timeout,
                                                     metadata=self._signed("StatBlob"))
        try:
            reply = await await_future(future)
        except grpc.RpcError as exc:
            raise _failed(address, exc) from None
        return reply.size if reply.present else None

    async def read(self, address: str, digest: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        """Stream `length` bytes (0: to the end) of a blob from `offset`. Raises PeerUnavailable."""
        call = self._stub(address).ReadBlob(pb.ReadBlobRequest(digest=digest, offset=offset, length=length),
                                            metadata=self._signed("ReadBlob"))
        async with aclosing(self._in_order(address, call, offset)) as chunks:
            async for chunk in chunks:
                yield chunk.data

    async def follow_fill(self, address: str, digest: str, offset: int = 0) -> "FollowedCall":
        """Start following the fill of `digest` in progress on the peer, from `offset`: returns
        once the peer has sent the blob's size. Raises FillNotFollowed when the peer has no such
        fill (or no room for another follower), PeerUnavailable when the call fails or the size
        does not come within FOLLOW_START_TIMEOUT. The call waits for a channel that is
        reconnecting (the peer just restarted) rather than failing at once."""
        call = self._stub(address).FollowFill(pb.FollowFillRequest(digest=digest, offset=offset),
                                              metadata=self._signed("FollowFill"), wait_for_ready=True)
        try:
            with anyio.move_on_after(FOLLOW_START_TIMEOUT):
                header = await self._next(address, call)
                if header is None:
                    raise PeerUnavailable(f"{address}: the fill's stream ended before its size")
                return FollowedCall(self, address, call, header.size, offset)
            call.cancel()
            raise PeerUnavailable(f"{address}: no answer to FollowFill within {FOLLOW_START_TIMEOUT:g}s")
        except PeerUnavailable as exc:
            call.cancel()
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise FillNotFollowed(str(exc), exc.code) from None
            raise

    async def _in_order(self, address: str, call, offset: int) -> AsyncIterator:
        """The messages of a streaming call of chunks, checked to follow each other from
        `offset`; the call is cancelled when the caller stops early."""
        expected = offset
        try:
            while (chunk := await self._next(address, call)) is not None:
                if chunk.offset != expected:
                    raise PeerUnavailable(f"{address}: chunk at {chunk.offset}, expected {expected}")
                expected += len(chunk.data)
                yield chunk
        finally:
            call.cancel()

    async def _next(self, address: str, call):
        """The next message of a streaming call (None at its end); a failed call is PeerUnavailable."""
        try:
            return await next_message(call, self._readers)
        except grpc.RpcError as exc:
            raise _failed(address, exc) from None

    async def copy(self, address: str, digest: str, offset: int, length: int,
                   sink: Callable[[bytes, threading.Event], None]) -> None:
        """Stream `length` bytes (0: to the end) of a blob from `offset` into `sink(data, stopping)`,
        which runs in the one worker thread that consumes the whole stream (see
        `grpc_bridge.consume_stream`: cancelling the awaiting task cancels the call, sets
        `stopping` and returns once the thread has). The chunks' offsets are checked. Raises
        PeerUnavailable when the stream fails; a stream that ends early just returns. Either
        way the bytes sunk so far stay sunk, and the caller goes on from where its sink got to."""
        call = self._stub(address).ReadBlob(pb.ReadBlobRequest(digest=digest, offset=offset, length=length),
                                            metadata=self._signed("ReadBlob"))
        expected = offset

        def consume(chunk, stopping: threading.Event) -> None:
            nonlocal expected
            if chunk.offset != expected:
                raise PeerUnavailable(f"{address}: chunk at {chunk.offset}, expected {expected}")
            expected += len(chunk.data)
            sink(chunk.data, stopping)

        await self._consume(address, call, consume)

    async def copy_many(self, address: str, digests: list[str],
                        consume: Callable[[int, int, bytes | None, threading.Event], None]) -> None:
        """Stream whole blobs (at most MAX_BLOBS_PER_CALL) in one call; `consume(index, offset,
        data, stopping)` runs in the one worker thread that reads the stream, with data None
        when the peer does not hold `digests[index]`. Blobs arrive in order, each from offset
        0 with contiguous chunks (checked). Raises PeerUnavailable when the stream fails;
        what was consumed before stays consumed."""
        call = self._stub(address).ReadBlobs(pb.ReadBlobsRequest(digests=digests), metadata=self._signed("ReadBlobs"))
        position = [-1, 0]      # the blob being received and the offset expected next

        def receive(chunk, stopping: threading.Event) -> None:
            index, expected = position
            if chunk.index != index:
                if chunk.index <= index or chunk.index >= len(digests) or chunk.offset != 0:
                    raise PeerUnavailable(f"{address}: chunk of blob {chunk.index} at {chunk.offset} "
                                          f"after blob {index}")
                index, expected = chunk.index, 0
            elif chunk.offset != expected or chunk.missing:
                raise PeerUnavailable(f"{address}: blob {index}: chunk at {chunk.offset}, expected {expected}")
            position[:] = [index, -1 if chunk.missing else expected + len(chunk.data)]
            consume(index, chunk.offset, None if chunk.missing else chunk.data, stopping)

        await self._consume(address, call, receive)

    async def _consume(self, address: str, call, consume: Callable[[object, threading.Event], None]) -> None:
        """The whole stream in one worker thread (`grpc_bridge.consume_stream`); a failed call
        is PeerUnavailable."""
        try:
            await consume_stream(call, consume, self._readers)
        except grpc.RpcError as exc:
            raise _failed(address, exc) from None


class FollowedCall:
    """A FollowFill call whose size message has arrived. Reading it (`chunks`) ends the call when
    the reader stops; a call never read ends when it is cancelled or collected (grpc cancels a
    call it collects), so an unread one (a HEAD request) holds the peer's thread no longer."""

    def __init__(self, client: PeerClient, address: str, call, size: int, offset: int):
        self.size = size
        self._client = client
        self._address = address
        self._call = call
        self._offset = offset

    async def chunks(self) -> AsyncIterator[bytes]:
        """The fill's bytes from the call's offset, as the peer releases them: PeerUnavailable when
        the fill fails or stalls or the peer goes away, so a body that is not the whole verified
        blob ends short."""
        async with aclosing(self._client._in_order(self._address, self._call, self._offset)) as chunks:
            async for chunk in chunks:
                yield chunk.data

    def cancel(self) -> None:
        self._call.cancel()
