"""A blob stream whose first chunk is already in hand.

An HTTP response commits its status and Content-Length before the body: a body stream that
fails on its first read (a local file deleted between its `stat` and its `open`, no peer able to
serve) can then only close the connection empty. `primed` takes that first read while the
caller can still choose another source or answer an error.
"""

from __future__ import annotations

from typing import AsyncIterator


class Primed:
    """`rest` with `first` put back in front; closing it closes `rest` (a file, a gRPC call)."""

    def __init__(self, first: bytes | None, rest: AsyncIterator[bytes]):
        self._first = first
        self._rest = rest

    def __aiter__(self) -> "Primed":
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


async def primed(chunks: AsyncIterator[bytes]) -> Primed:
    """`chunks` after its first read succeeded; what that read raises is raised here (and
    `chunks` closed). An empty stream stays empty."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()
        raise
    return Primed(first, chunks)
