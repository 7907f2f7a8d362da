"""A narrow ASGI layer: requests in, responses out, nothing registry-specific.

Kept deliberately small (no framework) because the manifest GET path is the hot path of a
registry and every layer between the socket and the read model costs throughput.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator
from urllib.parse import parse_qs

import anyio

from cargohold.oci import errors
from cargohold.oci.ranges import decimal

API_VERSION_HEADER = (b"docker-distribution-api-version", b"registry/2.0")
PREFETCH_CHUNKS = 2


class ClientDisconnected(Exception):
    """The client went away before sending the whole body."""


@dataclass(frozen=True)
class BodyPace:
    """How long the next read of a request body may wait (slow-client protection, free of I/O).

    Never more than `timeout` of silence; and with `min_rate` (bytes/s, 0: off) the body as a
    whole must keep up: its deadline is `timeout` after the first read, plus one second per
    `min_rate` bytes received (Apache's mod_reqtimeout rule). A trickle of a byte every few
    seconds never resets an idle timer, but it falls behind this deadline within `timeout`.
    """

    timeout: float = 60.0
    min_rate: float = 0.0

    def wait(self, elapsed: float, received: int) -> float:
        if self.min_rate <= 0:
            return self.timeout
        return max(0.0, min(self.timeout, self.timeout + received / self.min_rate - elapsed))


# RegistryAPI sets each request's pace from the `body_timeout` and `min_body_rate` settings.
DEFAULT_BODY_PACE = BodyPace()


# C0 and C1 controls, the Unicode line and paragraph separators, and the escape character itself.
_CONTROL = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
            for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, ord("\\")]}


def loggable(text: str) -> str:
    """`text` with control characters (CR, LF, NUL, ...) and backslashes escaped as \\xNN: a path
    is percent-decoded, and raw line breaks in it would let a client forge access log lines."""
    return text.translate(_CONTROL) if not text.isprintable() or "\\" in text else text


class Request:
    __slots__ = ("scope", "receive", "method", "path", "route", "received", "auth", "body_pace", "_query",
                 "_headers", "_consumed")

    def __init__(self, scope, receive):
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self._query: dict[str, list[str]] | None = None
        self._headers: dict[str, str] | None = None
        self._consumed = False
        self.body_pace = DEFAULT_BODY_PACE
        self.route = "other"
        self.auth = None            # set by access control (node/access.py): who is asking
        self.received = 0

    def header(self, name: str) -> str | None:
        if self._headers is None:
            self._headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.scope["headers"]}
        return self._headers.get(name)

    def query(self, name: str) -> str | None:
        values = self.query_all(name)
        return values[0] if values else None

    def query_all(self, name: str) -> list[str]:
        """Every value of a repeated query parameter (`?tag=a&tag=b`), in request order."""
        if self._query is None:
            raw = self.scope.get("query_string", b"").decode("latin-1")
            self._query = parse_qs(raw, keep_blank_values=True)
        return self._query.get(name, [])

    @property
    def client(self) -> str:
        client = self.scope.get("client")
        return client[0] if client else "-"

    async def body_chunks(self) -> AsyncIterator[bytes]:
        if self._consumed:
            return
        started = time.monotonic()
        while True:
            with anyio.move_on_after(self.body_pace.wait(time.monotonic() - started, self.received)) as idle:
                message = await self.receive()
            if idle.cancelled_caught:
                raise self._too_slow(time.monotonic() - started)
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            if chunk:
                self.received += len(chunk)
                yield chunk
            if not message.get("more_body", False):
                self._consumed = True
                return

    def _too_slow(self, elapsed: float) -> errors.RegistryError:
        pace = self.body_pace
        floor = f" (at least {pace.min_rate:.0f} bytes/s are needed)" if pace.min_rate > 0 else ""
        return errors.RegistryError("BLOB_UPLOAD_INVALID", f"request body too slow: {self.received} bytes in "
                                    f"{elapsed:.0f}s{floor}", 408, headers={"Connection": "close"})

    async def discard_body(self, limit: int = 8 * 1024 * 1024) -> bool:
        """Before an early error answer: read and drop a small unread body so that the connection
        stays usable (HTTP/1.1 clients send the whole body before they read the answer).
        Returns False when the body is too large to drain, or cannot be: then close the connection."""
        if self._consumed:
            return True
        declared = decimal(self.header("content-length"))
        if declared is None or declared - self.received > limit:
            return (self.header("transfer-encoding") is None and self.header("content-length") is None
                    and self.method in ("GET", "HEAD"))
        try:
            async for _ in self.body_chunks():
                pass
        except (ClientDisconnected, errors.RegistryError):
            return False
        return True

    def replay(self, body: bytes) -> None:
        """Hand a body that was read ahead (a push through a virtual name reads the manifest to
        link what it references first) to the handler that reads it next."""
        delivered = False

        async def receive():
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        self.receive, self._consumed, self.received = receive, False, 0

    async def read_body(self, limit: int) -> bytes:
        declared = decimal(self.header("content-length"))
        if declared is not None and declared > limit:
            raise errors.RegistryError("SIZE_INVALID", f"body larger than {limit} bytes", 413)
        parts: list[bytes] = []
        total = 0
        async for chunk in self.body_chunks():
            total += len(chunk)
            if total > limit:
                raise errors.RegistryError("SIZE_INVALID", f"body larger than {limit} bytes", 413)
            parts.append(chunk)
        return b"".join(parts)


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    length: int | None = None   # Content-Length of `stream` (or of a HEAD response)

    def header(self, name: str, value: str | int) -> "Response":
        self.headers.append((name.encode("latin-1"), str(value).encode("latin-1")))
        return self


def json_response(status: int, body: bytes, content_type: str = "application/json") -> Response:
    return Response(status, [(b"content-type", content_type.encode())], body)


def error_response(error: errors.RegistryError) -> Response:
    response = json_response(error.status, error.body())
    for name, value in error.headers.items():
        response.header(name, value)
    return response


async def send_response(send, response: Response, head: bool) -> int:
    """Send a response; returns the number of body bytes sent."""
    headers = response.headers
    headers.append(API_VERSION_HEADER)
    if response.stream is None:
        length = response.length if head and response.length is not None else len(response.body)
        headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        body = b"" if head else response.body
        await send({"type": "http.response.body", "body": body})
        return len(body)
    if response.length is not None:
        headers.append((b"content-length", str(response.length).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    sent = 0
    # Read ahead while sending: the server drains each chunk before `send` returns, and without a
    # chunk already in hand the socket would idle for every file read (a worker-thread trip).
    chunks_in, chunks_out = anyio.create_memory_object_stream[bytes](PREFETCH_CHUNKS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_pump, response.stream, chunks_in)
        async with chunks_out:
            async for chunk in chunks_out:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
    await send({"type": "http.response.body", "body": b""})
    return sent


async def _pump(stream: AsyncIterator[bytes], chunks_in) -> None:
    async with chunks_in, aclosing(stream) as source:   # close the file even if the client left
        async for chunk in source:
            await chunks_in.send(chunk)
