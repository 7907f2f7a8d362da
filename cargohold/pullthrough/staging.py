"""A blob being filled from upstream: a staging file that grows while readers follow it.

The filler hands each batch received from the upstream to `receive` (readers may have it from
memory at once), then writes it (`append`) and hashes it (`hash`) on worker threads. Readers on
this node take the recent part of the blob from memory, the same bytes objects the filler got,
so following a fill costs no file read and no copy; a reader that falls further behind than
RECENT_BYTES reads the rest from the file. All fills of a node share RECENT_BUDGET for this, so
many fills at once keep less each. The file is written buffered and its pages stay cached
(`StagingWriter(keep_cached=True)`): the blob just filled is what the next pulls read.

`released` is the one rule that keeps wrong bytes from ever being accepted: everything received
is released except the last byte, which waits until the whole blob has hashed to its digest. A
client therefore never receives a complete body that fails the check: on a mismatch its
response ends one byte short.

Other nodes follow a fill over gRPC (`FollowFill`), served on grpc's pool threads, not on the
event loop: such a reader (`FillTail`) takes only what is on file and released, never the
in-memory batches the loop changes, and waits on a threading.Condition that the loop notifies
wherever it wakes its own readers.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path
from typing import AsyncIterable, AsyncIterator

import anyio

from cargohold.blobs.store import StagingWriter
from cargohold.oci.reference import Digest
from cargohold.upstream.errors import DigestMismatch, UpstreamUnavailable

WRITE_BATCH = 1024 * 1024      # bytes gathered from the upstream before one worker-thread write
READ_CHUNK = 1024 * 1024       # the most one reader reads from the file in one worker-thread trip
RECENT_BYTES = 8 * 1024 * 1024     # bytes a fill keeps in memory for readers (and those not on file yet)
RECENT_BUDGET = 256 * 1024 * 1024  # the most all fills of a node keep so, however many run


def releasable(written: int, size: int, verified: bool) -> int:
    """How many bytes readers may have: all that is written once the digest is verified, and
    until then all but the last byte of the blob."""
    return written if verified else max(0, min(written, size - 1))


async def batches(chunks: AsyncIterable[bytes], batch: int = WRITE_BATCH) -> AsyncIterator[bytes]:
    """The chunks joined into pieces of at least `batch` bytes (the last may be smaller). One
    join is the only copy a batch gets: the write, the hash and every reader then take the
    same object, one worker-thread trip or one send per batch instead of one per read."""
    parts: list[bytes] = []
    gathered = 0
    async for chunk in chunks:
        parts.append(chunk)
        gathered += len(chunk)
        if gathered >= batch:
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            parts, gathered = [], 0
    if parts:
        yield b"".join(parts)


class RecentBytes:
    """The most recent batches of a growing blob, by offset: what readers take from memory."""

    def __init__(self) -> None:
        self._batches: collections.deque[tuple[int, bytes]] = collections.deque()
        self.start = 0        # the offset of the oldest byte held
        self.end = 0          # one past the newest byte held

    def add(self, batch: bytes) -> None:
        if not self._batches:
            self.start = self.end
        self._batches.append((self.end, batch))
        self.end += len(batch)

    def trim(self, keep_from: int) -> None:
        """Drop the batches that end at or before `keep_from`."""
        while self._batches and self._batches[0][0] + len(self._batches[0][1]) <= keep_from:
            offset, batch = self._batches.popleft()
            self.start = offset + len(batch)
        if not self._batches:
            self.start = self.end

    def clear(self) -> None:
        self._batches.clear()
        self.start = self.end

    def at(self, position: int, limit: int) -> bytes | None:
        """The bytes held from `position` up to the end of its batch and at most `limit`; None
        when `position` is older than what is held. Whole batches go out as they are."""
        if position < self.start or position >= self.end:
            return None
        for offset, batch in self._batches:
            if offset <= position < offset + len(batch):
                begin, stop = position - offset, min(len(batch), limit - offset)
                return batch if (begin, stop) == (0, len(batch)) else batch[begin:stop]
        return None


class GrowingFile:
    """The staging file of one fill. Batches are received in order (`receive`), then written in
    order by one task (`append`) and hashed in order by another (`hash`), so that readers get
    bytes without waiting for the disk or the hash, and writing and hashing use two cores;
    `verify` once both are done. Read by any number of readers (`follow`); `fail` ends it for
    everyone."""

    def __init__(self, path: Path, digest: Digest, size: int | None):
        self.path = path
        self.digest = digest
        self.size = size                 # announced by the upstream; None if it did not say
        self.received = 0
        self.verified = False
        self.error: BaseException | None = None
        self._recent = RecentBytes()
        self._on_file = 0                # bytes a reader of the file can see
        self._hasher = digest.hasher()
        self._writer: StagingWriter | None = None
        self._read_fd: int | None = None
        self._changed = anyio.Event()
        # for readers on other threads: (bytes released and on file, the fill's error), under _progress
        self._progress = threading.Condition()
        self._shared: tuple[int, BaseException | None] = (0, None)

    live = 0      # fills whose readers may take bytes from memory (changed on the event loop only)

    @classmethod
    async def create(cls, path: Path, digest: Digest, size: int | None) -> "GrowingFile":
        staged = cls(path, digest, size)
        await anyio.to_thread.run_sync(staged._open)
        GrowingFile.live += 1
        return staged

    @classmethod
    def recent_window(cls) -> int:
        """What each fill keeps in memory for its readers now: RECENT_BYTES while few fills run,
        their share of RECENT_BUDGET when many do, never less than one batch."""
        return max(WRITE_BATCH, min(RECENT_BYTES, RECENT_BUDGET // max(1, cls.live)))

    def _open(self) -> None:
        self._writer = StagingWriter(self.path, keep_cached=True)
        self._read_fd = os.open(self.path, os.O_RDONLY)

    # ------------------------------------------------------------------ the filler's side
    @property
    def released(self) -> int:
        if self.size is None:
            return 0
        return releasable(self.received, self.size, self.verified)

    def receive(self, batch: bytes) -> None:
        """The next batch from the upstream: readers may have it now (but the last byte)."""
        if self.size is not None and self.received + len(batch) > self.size:
            raise UpstreamUnavailable(f"blob {self.digest}: upstream sent more than the {self.size} bytes it announced")
        self._recent.add(batch)
        self.received += len(batch)
        self._notify()

    async def append(self, batches: list[bytes]) -> None:
        """Write the next received batches to the file (one worker-thread trip)."""
        self._on_file = await anyio.to_thread.run_sync(self._write, batches)
        self._recent.trim(min(self._on_file, self.received - self.recent_window()))
        self._share()

    def _write(self, batches: list[bytes]) -> int:
        for batch in batches:
            self._writer.write(batch)
        return self._writer.visible()

    async def hash(self, batches: list[bytes]) -> None:
        """Hash the next received batches (one worker-thread trip)."""
        await anyio.to_thread.run_sync(self._hash, batches)

    def _hash(self, batches: list[bytes]) -> None:
        for batch in batches:
            self._hasher.update(batch)

    async def verify(self) -> None:
        """The whole blob is here: check its size and digest (DigestMismatch), then release the rest."""
        if self.size is not None and self.received != self.size:
            raise UpstreamUnavailable(f"blob {self.digest}: upstream sent {self.received} of {self.size} bytes")
        await anyio.to_thread.run_sync(self._finish_writer)
        self._on_file = self.received
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(f"blob {self.digest}: upstream sent bytes hashing to "
                                 f"{self.digest.algorithm}:{actual}")
        self.size = self.received
        self.verified = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        """The fill ended without a verified blob: readers raise `error`."""
        if self.error is None and not self.verified:
            self.error = error
            self._notify()

    async def discard(self) -> None:
        """Close everything and delete the file (a failed fill)."""
        await anyio.to_thread.run_sync(self._delete)
        self.close_readers()

    def _delete(self) -> None:
        self._close_writer()
        self.path.unlink(missing_ok=True)

    def _finish_writer(self) -> None:
        self._writer.finish()
        self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close_readers(self) -> None:
        """No new reader will follow this file (it was published or discarded). Readers that
        started keep their own descriptor and read the rest from the complete file. Call on the
        event loop."""
        self._recent.clear()
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
            GrowingFile.live -= 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self._share()

    def _share(self) -> None:
        """Tell readers on other threads what they may read now (see FillTail)."""
        with self._progress:
            self._shared = (min(self.released, self._on_file), self.error)
            self._progress.notify_all()

    def tail(self) -> "FillTail | None":
        """A reader for another thread, with its own descriptor (call on the event loop); None
        once no new reader can follow (published, discarded) or when the size is unknown."""
        if self._read_fd is None or self.size is None or self.error is not None:
            return None
        return FillTail(self, os.dup(self._read_fd))

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
                available = min(self.released, end)
                if available <= position:
                    await changed.wait()
                    continue
                chunk = self._recent.at(position, available)
                if chunk is None:      # older than memory holds, so on file: see `append`
                    chunk = await anyio.to_thread.run_sync(
                        os.pread, fd, min(READ_CHUNK, available - position, self._recent.start - position), position)
                if not chunk:
                    raise UpstreamUnavailable(f"blob {self.digest}: staging file ended early")
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)


class FillTail:
    """One reader of a GrowingFile on a thread other than the event loop's (a gRPC pool thread
    serving a peer that follows the fill). It reads the file only, up to what the loop last
    shared: released (the last byte waits for the digest check, as for every reader) and
    written. Its own descriptor stays valid after the file is published or deleted."""

    def __init__(self, staged: GrowingFile, fd: int):
        self.size: int = staged.size
        self._staged = staged
        self._fd = fd

    def readable(self, position: int, timeout: float) -> int:
        """How far the blob may be read: at once if past `position`, else after waiting for the
        fill's next step, at most `timeout` seconds. Raises the fill's error."""
        staged = self._staged
        with staged._progress:
            if staged._shared[0] <= position and staged._shared[1] is None:
                staged._progress.wait(timeout)
            readable, error = staged._shared
        if isinstance(error, Exception):
            raise error
        if error is not None:   # the fill was cancelled: its loop's Cancelled means nothing on this thread
            raise UpstreamUnavailable(f"blob {staged.digest}: the fill was interrupted")
        return readable

    def read(self, position: int, end: int) -> bytes:
        """Up to READ_CHUNK bytes from `position`, not past `end` (which `readable` allowed)."""
        return os.pread(self._fd, min(READ_CHUNK, end - position), position)

    def wake(self) -> None:
        """End a `readable` wait early (the peer went away)."""
        with self._staged._progress:
            self._staged._progress.notify_all()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
