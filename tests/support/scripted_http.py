"""A tiny HTTP/1.1 server on a loopback port whose answers a test scripts, for the upstream
behaviours a real registry will not show on demand: wrong bytes, 429, 5xx, redirects, and a
socket that accepts and never answers. One request per connection (`Connection: close`)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import anyio
from anyio.abc import SocketStream


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hold_open: bool = False     # after the body, keep the connection open and silent (a stalled body)


@dataclass(frozen=True)
class Asked:
    method: str
    path: str
    headers: dict[str, str]


Script = Callable[[Asked], Answer | None]     # None: accept and never answer (a stalled upstream)


@dataclass
class ScriptedServer:
    url: str
    asked: list[Asked]


async def _read_head(stream: SocketStream) -> Asked | None:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return Asked(method, path, headers)


def _encode(answer: Answer, method: str) -> bytes:
    headers = {"Content-Length": str(len(answer.body)), "Connection": "close", **answer.headers}
    head = f"HTTP/1.1 {answer.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if method == "HEAD" else answer.body)


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[ScriptedServer]:
    """`async with scripted_server(lambda asked: Answer(503)) as server:` ... `server.url`."""
    asked: list[Asked] = []

    async def serve(stream: SocketStream) -> None:
        async with stream:
            request = await _read_head(stream)
            if request is None:
                return
            asked.append(request)
            answer = script(request)
            if answer is None:
                await anyio.sleep_forever()
            await stream.send(_encode(answer, request.method))
            if answer.hold_open:
                await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, serve)
        try:
            yield ScriptedServer(f"http://127.0.0.1:{port}", asked)
        finally:
            tasks.cancel_scope.cancel()
