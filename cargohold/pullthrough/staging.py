"""A blob being filled from upstream: a staging file that grows while readers follow it.

The filler appends batches (written and hashed on worker threads); readers on this node read
what has been released so far and wait for more. `released` is the one rule that keeps wrong
bytes from ever being accepted: everything written is released except the last byte, which
waits until the whole blob has hashed to its digest. A client therefore never receives a
complete body that fails the check: on a mismatch its response ends one byte short.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterable, AsyncIterator

import anyio

from cargohold.blobs.store import StagingWriter
from cargohold.oci.reference import Digest
from cargohold.upstream.errors import DigestMismatch, UpstreamUnavailable

WRITE_BATCH = 1024 * 1024      # bytes gathered from the upstream before one worker-thread write
READ_CHUNK = 1024 * 1024       # the most one reader reads in one worker-thread trip


def releasable(written: int, size: int, verified: bool) -> int:
    """How many bytes readers may have: all that is written once the digest is verified, and
    until then all but the last byte of the blob."""
    return written if verified else max(0, min(written, size - 1))


async def batches(chunks: AsyncIterable[bytes], batch: int = WRITE_BATCH) -> AsyncIterator[list[bytes]]:
    """The chunks in groups of at least `batch` bytes (the last may be smaller), so that each
    worker-thread trip moves a useful amount. Not joined: that would copy every byte once more."""
    parts: list[bytes] = []
    gathered = 0
    async for chunk in chunks:
        parts.append(chunk)
        gathered += len(chunk)
        if gathered >= batch:
            yield parts
            parts, gathered = [], 0
    if parts:
        yield parts


class GrowingFile:
    """The staging file of one fill. Its batches are written in order by one task (`append`)
    and hashed in order by another (`hash`), so that readers get bytes without waiting for the
    hash, and writing and hashing use two cores; `verify` once both are done. Read by any number
    of readers (`follow`); `fail` ends it for everyone."""

    def __init__(self, path: Path, digest: Digest, size: int | None):
        self.path = path
        self.digest = digest
        self.size = size                 # announced by the upstream; None if it did not say
        self.written = 0
        self.verified = False
        self.error: BaseException | None = None
        self._hasher = digest.hasher()
        self._writer: StagingWriter | None = None
        self._read_fd: int | None = None
        self._changed = anyio.Event()

    @classmethod
    async def create(cls, path: Path, digest: Digest, size: int | None) -> "GrowingFile":
        staged = cls(path, digest, size)
        await anyio.to_thread.run_sync(staged._open)
        return staged

    def _open(self) -> None:
        # Buffered, not O_DIRECT: readers following the writer find the bytes in the page cache.
        self._writer = StagingWriter(self.path, direct=False)
        self._read_fd = os.open(self.path, os.O_RDONLY)

    # ------------------------------------------------------------------ the filler's side
    @property
    def released(self) -> int:
        if self.size is None:
            return 0
        return releasable(self.written, self.size, self.verified)

    async def append(self, batch: list[bytes]) -> None:
        size = sum(map(len, batch))
        if self.size is not None and self.written + size > self.size:
            raise UpstreamUnavailable(f"blob {self.digest}: upstream sent more than the {self.size} bytes it announced")
        await anyio.to_thread.run_sync(self._write, batch)
        self.written += size
        self._notify()

    def _write(self, batch: list[bytes]) -> None:
        for part in batch:
            self._writer.write(part)
        self._writer.finish()          # flushed: readers may read it now

    async def hash(self, batch: list[bytes]) -> None:
        await anyio.to_thread.run_sync(self._hash, batch)

    def _hash(self, batch: list[bytes]) -> None:
        for part in batch:
            self._hasher.update(part)

    async def verify(self) -> None:
        """The whole blob is here: check its size and digest (DigestMismatch), then release the rest."""
        if self.size is not None and self.written != self.size:
            raise UpstreamUnavailable(f"blob {self.digest}: upstream sent {self.written} of {self.size} bytes")
        await anyio.to_thread.run_sync(self._close_writer)
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(f"blob {self.digest}: upstream sent bytes hashing to "
                                 f"{self.digest.algorithm}:{actual}")
        self.size = self.written
        self.verified = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        """The fill ended without a verified blob: readers raise `error`."""
        if self.error is None and not self.verified:
            self.error = error
            self._notify()

    async def discard(self) -> None:
        """Close everything and delete the file (a failed fill)."""
        await anyio.to_thread.run_sync(self._discard)

    def _discard(self) -> None:
        self._close_writer()
        self.path.unlink(missing_ok=True)
        self.close_readers()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close_readers(self) -> None:
        """No new reader will follow this file (it was published or discarded); readers that
        started keep their own descriptor."""
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # ------------------------------------------------------------------ the readers' side
    def following(self) -> bool:
        """Whether a new reader can still follow the file (else it reads the published blob)."""
        return self._read_fd is not None

    async def follow(self, start: int, length: int) -> AsyncIterator[bytes]:
        """`length` bytes from `start`, each as soon as it is released; raises the fill's error."""
        fd = os.dup(self._read_fd)
        try:
            position, end = start, start + length
            while position < end:
                changed = self._changed
                if self.error is not None:
                    raise self.error
                available = min(self.released, end) - position
                if available <= 0:
                    await changed.wait()
                    continue
                chunk = await anyio.to_thread.run_sync(os.pread, fd, min(READ_CHUNK, available), position)
                if not chunk:
                    raise UpstreamUnavailable(f"blob {self.digest}: staging file ended early")
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)
