"""Check a digest while the bytes stream past, so a cache can forward each chunk as it arrives
and still refuse to publish bytes that do not match."""

from __future__ import annotations

from typing import AsyncIterable, AsyncIterator

import anyio

from cargohold.oci.reference import Digest
from cargohold.upstream.errors import DigestMismatch

# Chunks at least this large are hashed on a worker thread, off the event loop.
HASH_IN_THREAD_BYTES = 256 * 1024


async def hash_chunk(hasher, chunk: bytes) -> None:
    if len(chunk) >= HASH_IN_THREAD_BYTES:
        await anyio.to_thread.run_sync(hasher.update, chunk)
    else:
        hasher.update(chunk)


async def verified(chunks: AsyncIterable[bytes], expected: Digest, *, what: str = "blob") -> AsyncIterator[bytes]:
    """Yield `chunks` unchanged, hashing them; after the last one raise DigestMismatch if the bytes
    do not hash to `expected`. The caller publishes only once the iteration ended without error
    (and wraps it in `contextlib.aclosing` if it may stop early)."""
    hasher = expected.hasher()
    async for chunk in chunks:
        await hash_chunk(hasher, chunk)
        yield chunk
    actual = hasher.hexdigest()
    if actual != expected.hex:
        raise DigestMismatch(f"{what}: upstream sent bytes hashing to {expected.algorithm}:{actual}, not {expected}")
