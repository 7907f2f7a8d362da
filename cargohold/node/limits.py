"""Connection limits for both HTTP servers (issue 12 item 6): slow and idle clients must not hold
sockets or memory forever.

What each server lacks, and what is added here:

- uvicorn (asyncio) parses with httptools, which is why it is fast (DESIGN.md) but which has no
  limit on a request head's size and no timer while a head arrives (uvicorn arms its keep-alive
  timer only after a response). `guarded_httptools` subclasses uvicorn's httptools protocol:
  a head must arrive within `header_timeout` of the connection or of its first byte (408 and
  close), may not exceed `max_header_size` bytes (431 and close, checked after each read of at
  most 256 KiB, so a head never grows more than a read or two past the limit), and a connection beyond
  `max_connections` is answered 503 at once and closed, before it can hold anything.
- hypercorn (trio) parses with h11, whose `max_incomplete_event_size` bounds a head (431), and
  its idle timer runs from the connection (or the end of the previous response) until a whole
  head has arrived: so `keep_alive_timeout` is also the head timeout there, and both are set to
  the shorter of the two settings. hypercorn has no connection cap: `capped_hypercorn` replaces
  the TCPServer class its trio worker instantiates per connection (hypercorn is pinned in
  pyproject.toml) by one that refuses connections beyond the cap the same way.

A trickling request *body* is the application's business on both runtimes: `Request.body_chunks`
(node/http.py) enforces `body_timeout` and `min_body_rate`.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("cargohold.http")

# Sockets the node needs besides client connections: etcd and gRPC channels, blob files, etcd's own.
RESERVED_DESCRIPTORS = 256

_REFUSAL_BODY = (b'{"errors":[{"code":"TOOMANYREQUESTS","message":"too many connections to this node; '
                 b'retry later"}]}')
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY)
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n"
                  b"content-length: 0\r\n\r\n")
HEAD_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float       # seconds for a whole request head (and for the first one to start)
    keep_alive_timeout: float   # seconds an idle keep-alive connection stays open
    max_header_size: int        # bytes of request line plus headers
    max_connections: int        # open client connections; more are answered 503 and closed


def connection_cap(wanted: int, soft_nofile: int | None = None) -> int:
    """The connection cap that fits under this process's descriptor limit (a cap above it would
    let idle sockets starve etcd, gRPC and blob files of descriptors: the attack in issue 12)."""
    if soft_nofile is None:
        soft_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_nofile == resource.RLIM_INFINITY:
        return wanted
    fits = max(soft_nofile - RESERVED_DESCRIPTORS, 16)
    if wanted > fits:
        log.warning("max_connections %d lowered to %d: the descriptor limit (ulimit -n) is %d",
                    wanted, fits, soft_nofile)
    return min(wanted, fits)


class HeadGuard:
    """The state of one connection's current request head, free of I/O: the protocol tells it
    what happened and asks whether the head is over its size limit."""

    __slots__ = ("limit", "reading", "started", "received")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reading = True         # a new connection waits for a head
        self.started = False        # any byte of it seen
        self.received = 0

    def data(self, size: int) -> None:
        if self.reading:
            self.started = True
            self.received += size

    def head_begins(self) -> None:
        self.reading, self.started, self.received = True, True, 0

    def head_complete(self) -> None:
        self.reading = False

    @property
    def too_large(self) -> bool:
        return self.reading and self.received > self.limit


def guarded_httptools(limits: ConnectionLimits):
    """uvicorn's httptools protocol class with the limits above (see the module docstring)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head = HeadGuard(limits.max_header_size)
            self.head_timer = None
            if len(self.connections) > limits.max_connections:
                self._refuse(BUSY)
                return
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            # Bytes after the head's end count too (at most this read); a head that begins inside
            # this read restarts the count (on_message_begin), so it is checked from the next read.
            self.head.data(len(data))
            super().data_received(data)
            if self.head.too_large:
                self._refuse(HEAD_TOO_LARGE)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head.head_begins()
            if self.head_timer is None:
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self.head.head_complete()
            self._disarm_head_timer()
            super().on_headers_complete()

        def _arm_head_timer(self) -> None:
            self.head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.head.reading and not self.transport.is_closing():
                self._refuse(HEAD_TIMEOUT if self.head.started else b"")

        def _refuse(self, answer: bytes) -> None:
            self._disarm_head_timer()
            if answer:
                self.transport.write(answer)
            self.transport.close()

    return GuardedHttpToolsProtocol


def capped_hypercorn(max_connections: int) -> None:
    """Make hypercorn's trio worker refuse connections beyond `max_connections` (503, closed)."""
    import trio
    from hypercorn.trio import run

    base = getattr(run.TCPServer, "uncapped", run.TCPServer)
    open_connections = 0

    class CappedTCPServer(base):
        uncapped = base

        async def run(self) -> None:
            nonlocal open_connections
            if open_connections >= max_connections:
                with trio.move_on_after(1):
                    try:
                        await self.stream.send_all(BUSY)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                await self.stream.aclose()
                return
            open_connections += 1
            try:
                await super().run()
            finally:
                open_connections -= 1

    run.TCPServer = CappedTCPServer
