"""`primed`: a body stream's first read happens before the response commits its headers."""

from __future__ import annotations

import pytest

from cargohold.blobs.streams import primed

pytestmark = pytest.mark.anyio


class Chunks:
    """An async iterator of `chunks` that raises `fail` after them, and records its closing."""

    def __init__(self, chunks: list[bytes], fail: Exception | None = None):
        self.chunks = list(chunks)
        self.fail = fail
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


async def test_the_first_chunk_is_read_up_front_and_served_first():
    source = Chunks([b"a", b"b", b"c"])
    stream = await primed(source)
    assert source.chunks == [b"b", b"c"]
    assert [chunk async for chunk in stream] == [b"a", b"b", b"c"]


async def test_a_failing_first_read_raises_before_the_stream_is_handed_out_and_closes_it():
    source = Chunks([], fail=FileNotFoundError("dropped"))
    with pytest.raises(FileNotFoundError):
        await primed(source)
    assert source.closed


async def test_an_empty_stream_stays_empty():
    assert [chunk async for chunk in await primed(Chunks([]))] == []


async def test_a_failure_after_the_first_chunk_reaches_the_body():
    stream = await primed(Chunks([b"a"], fail=ConnectionError("peer gone")))
    assert await stream.__anext__() == b"a"
    with pytest.raises(ConnectionError):
        await stream.__anext__()


async def test_closing_an_unread_stream_closes_its_source():
    source = Chunks([b"a", b"b"])
    stream = await primed(source)
    await stream.aclose()
    assert source.closed
