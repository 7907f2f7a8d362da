"""Content-addressed blob storage.

`BlobStore` is the one small interface every backend implements (the shared test suite in
tests/unit/test_storage.py runs against each). `FilesystemBlobStore` keeps blobs at
`blobs/<algorithm>/<first two hex>/<hex>`. A blob becomes visible under its digest only by an
atomic rename of a file whose bytes were hashed to that digest and fsynced, so a crash at any
point leaves either nothing or the whole, verified blob.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import shutil
import threading
from pathlib import Path
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterator, Protocol

import anyio

from cargohold.oci import errors
from cargohold.runtime import libc
from cargohold.oci.reference import Digest

READ_CHUNK = 1024 * 1024
HASH_CHUNK = 4 * 1024 * 1024


class BlobStore(Protocol):
    async def stat(self, digest: Digest) -> int | None:
        """Size of the blob, or None when this store does not hold it."""

    def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream `length` bytes from `offset` (to the end when None). BLOB_UNKNOWN if absent."""

    async def read_all(self, digest: Digest) -> bytes:
        """The whole blob in memory (manifests and configs only)."""

    async def write(self, digest: Digest, data: bytes) -> None:
        """Store small content; DIGEST_INVALID if the bytes do not hash to `digest`."""

    async def ingest(self, digest: Digest, source: Path) -> None:
        """Move a file whose content was verified against `digest` into the store (consumes it)."""

    def ingest_blocking(self, digest: Digest, source: Path) -> None:
        """The same, called from a worker thread that already does the blob's I/O."""

    async def delete(self, digest: Digest) -> bool:
        """Remove the local copy; True if there was one."""

    def staging_path(self) -> Path:
        """A fresh path on the store's file system for content that is later ingested."""

    def locked(self, digest: Digest):
        """An async context manager serialising, on this node, changes to one digest's copy
        (ingest and publish vs. a GC deletion)."""

    def inventory(self) -> Iterator[tuple[Digest, float]]:
        """Every blob held, with its modification time (a disk walk: for the scrub only)."""


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path, digest: Digest) -> str:
    """Hex digest of a file, computed in large chunks (call from a worker thread)."""
    hasher = digest.hasher()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


WRITE_BEHIND_WINDOW = 8 * 1024 * 1024
_SYNC_FILE_RANGE = (libc.function("sync_file_range", [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                                       ctypes.c_uint])
                    if hasattr(os, "posix_fadvise") else None)
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class WriteBehind:
    """Write-behind and drop-behind for a large file written front to back (call from the
    writing thread): whenever another `window` bytes are written, start writing them to disk,
    wait until the window before them is on disk and drop its pages from the page cache
    (unless `drop` is False: a blob that is about to be read keeps them).

    So a large blob passes through two windows of page cache instead of occupying its whole
    size in it. Fresh page-cache pages are what costs on VMs whose balloon hands free memory
    back to the host (a fault per page, ~1.8 CPU-s per GiB written here, against ~0.3 CPU-s
    when the pages are reused), and the final fsync finds little left to write. Nothing
    changes for durability: the caller still fsyncs before the file is published. A no-op
    where sync_file_range is not available (not Linux)."""

    def __init__(self, fd: int, window: int = WRITE_BEHIND_WINDOW, *, drop: bool = True):
        self.fd = fd
        self.drop = drop      # False: keep the written pages cached (a blob about to be read)
        self.window = window
        self.started = 0      # writeback started for [0, started)
        self.dropped = 0      # on disk and out of the page cache: [0, dropped)

    def written(self, size: int) -> None:
        """The file now has `size` bytes."""
        if _SYNC_FILE_RANGE is None:
            return
        while size - self.started >= self.window:
            _SYNC_FILE_RANGE(self.fd, self.started, self.window, _WRITE)
            self.started += self.window
            if self.started - self.dropped > self.window:   # the window before the one just started
                _SYNC_FILE_RANGE(self.fd, self.dropped, self.window, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
                if self.drop:
                    try:
                        os.posix_fadvise(self.fd, self.dropped, self.window, os.POSIX_FADV_DONTNEED)
                    except OSError:      # advice only: a file system that refuses it keeps its cache
                        pass
                self.dropped += self.window


DIRECT_BLOCK = 4096                      # O_DIRECT alignment that every common device accepts
DIRECT_BUFFER = 4 * 1024 * 1024          # bytes gathered before one direct write
_KEPT_BUFFERS = 64                       # idle aligned buffers kept for reuse (256 MiB at most)


class _AlignedBuffers:
    """Page-aligned buffers (anonymous mmaps) for O_DIRECT writes, reused across files: fresh
    pages cost a fault each, and on VMs whose balloon takes freed memory back that is most of
    the CPU a write costs (measured in bench/CLUSTER.md)."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, DIRECT_BUFFER)

    def give_back(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < _KEPT_BUFFERS:
                self._free.append(buffer)
                return
        buffer.close()


_BUFFERS = _AlignedBuffers()


class StagingWriter:
    """Writes a new file front to back, from one thread at a time (a fetch's stream thread).

    Where the file system allows it the file is opened with O_DIRECT: the bytes go from a
    reused aligned buffer to the device without a page-cache copy, which on this kind of VM
    takes about a tenth of the CPU of a buffered write of a fresh file and leaves the cache to
    the blobs being read. The tail is written as a whole padded block, then the file is cut
    back to its size. Elsewhere (tmpfs without O_DIRECT, non-Linux) it is an ordinary buffered
    file, written behind in windows (WriteBehind). `keep_cached` asks for that buffered file
    everywhere and keeps its pages cached: a pull-through fill writes a blob that its clients
    will read again at once. Either way nothing is durable until the store's ingest fsyncs the
    file; `finish()` only completes it."""

    def __init__(self, path: Path, *, direct: bool = True, keep_cached: bool = False):
        self.path = path
        self.size = 0                      # bytes accepted so far
        self._buffer: mmap.mmap | None = None
        self._filled = 0                   # bytes in the buffer not yet written
        self._fd = self._open_direct(path) if direct and not keep_cached and _O_DIRECT else None
        if self._fd is not None:
            self._buffer = _BUFFERS.take()
            self._file = None
        else:
            self._file = open(path, "wb")
            self._behind = WriteBehind(self._file.fileno(), drop=not keep_cached)

    @property
    def direct(self) -> bool:
        return self._buffer is not None

    @staticmethod
    def _open_direct(path: Path) -> int | None:
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system does not do O_DIRECT
                raise
            return None

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
            self.size += len(data)
            self._behind.written(self.size)
            return
        view = memoryview(data)
        while view:
            room = DIRECT_BUFFER - self._filled
            part = view[:room]
            self._buffer[self._filled:self._filled + len(part)] = part
            self._filled += len(part)
            self.size += len(part)
            view = view[len(part):]
            if self._filled == DIRECT_BUFFER:
                self._write_buffer(DIRECT_BUFFER)

    def _write_buffer(self, length: int) -> None:
        """Write the first `length` bytes of the buffer (a multiple of DIRECT_BLOCK)."""
        view = memoryview(self._buffer)[:length]
        try:
            written = 0
            while written < length:     # a short direct write ends on a block boundary
                written += os.write(self._fd, view[written:])
        finally:
            view.release()
        self._filled = 0

    def visible(self) -> int:
        """How many bytes a reader of the file sees now: all accepted but those waiting in the
        direct buffer for a whole block (a buffered file is flushed first)."""
        if self._file is not None:
            self._file.flush()
            return self.size
        return self.size - self._filled

    def finish(self) -> None:
        """Write what is still buffered: the file then holds exactly the bytes written."""
        if self._file is not None:
            self._file.flush()
            return
        if self._filled:
            tail = self._filled
            padded = -(-tail // DIRECT_BLOCK) * DIRECT_BLOCK
            self._buffer[tail:padded] = bytes(padded - tail)
            self._write_buffer(padded)
            os.ftruncate(self._fd, self.size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._buffer is not None:
            _BUFFERS.give_back(self._buffer)
            self._buffer = None


class FilesystemBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._staging = self.root / "staging"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._clear_staging()
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    def _clear_staging(self) -> None:
        # Anything left in staging was never acknowledged: an interrupted write.
        for leftover in self._staging.iterdir():
            leftover.unlink(missing_ok=True)

    def path_of(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def staging_path(self) -> Path:
        return self._staging / secrets.token_hex(16)

    @asynccontextmanager
    async def locked(self, digest: Digest):
        key = str(digest)
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self._blobs).free

    def inventory(self) -> Iterator[tuple[Digest, float]]:
        for algorithm_dir in self._blobs.iterdir():
            for shard in algorithm_dir.iterdir():
                for path in shard.iterdir():
                    try:
                        yield Digest(algorithm_dir.name, path.name), path.stat().st_mtime
                    except FileNotFoundError:
                        continue

    async def stat(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.path_of(digest)).st_size
        except FileNotFoundError:
            return None

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        try:
            f = await anyio.to_thread.run_sync(open, self.path_of(digest), "rb")
        except FileNotFoundError:
            raise errors.blob_unknown(detail={"digest": str(digest)}) from None
        try:
            if offset:
                f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                want = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = await anyio.to_thread.run_sync(f.read, want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            f.close()

    async def read_all(self, digest: Digest) -> bytes:
        try:
            return await anyio.to_thread.run_sync(self.path_of(digest).read_bytes)
        except FileNotFoundError:
            raise errors.blob_unknown(detail={"digest": str(digest)}) from None

    async def write(self, digest: Digest, data: bytes) -> None:
        if Digest.of(data, digest.algorithm) != digest:
            raise errors.digest_invalid(detail={"digest": str(digest)})
        await anyio.to_thread.run_sync(self._write_verified, digest, data)

    def _write_verified(self, digest: Digest, data: bytes) -> None:
        target = self.path_of(digest)
        if target.exists():
            return
        temp = self.staging_path()
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._publish(temp, target)

    async def ingest(self, digest: Digest, source: Path) -> None:
        await anyio.to_thread.run_sync(self.ingest_blocking, digest, source)

    def ingest_blocking(self, digest: Digest, source: Path) -> None:
        target = self.path_of(digest)
        if target.exists():
            source.unlink(missing_ok=True)
            return
        with open(source, "rb+") as f:
            os.fsync(f.fileno())
        self._publish(source, target)

    def _publish(self, temp: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(temp, target)
        except OSError as exc:  # pragma: no cover - cross-device is a deployment error
            temp.unlink(missing_ok=True)
            if exc.errno == errno.EXDEV:
                raise RuntimeError("staging and blob directories must be on one file system") from exc
            raise
        fsync_directory(target.parent)

    async def delete(self, digest: Digest) -> bool:
        # Unlinking a large file frees its extents and can take a while: not on the event loop.
        return await anyio.to_thread.run_sync(self._unlink, self.path_of(digest))

    @staticmethod
    def _unlink(path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
