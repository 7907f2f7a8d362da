"""Blob upload sessions on local disk.

A session is a directory `uploads/<id>/` with `meta.json` (written and fsynced at creation)
and `data` (the bytes received so far, fsynced before each chunk is acknowledged). Sessions
survive a restart: the offset is the size of `data`. The running hash lives in memory; after
a restart the file is hashed again when the upload completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import anyio

from cargohold.oci import errors
from cargohold.oci.reference import Digest, validate_upload_id
from cargohold.blobs.store import BlobStore, fsync_directory, hash_file

# Body chunks are gathered to this size before one trip to a worker thread writes and hashes them.
WRITE_BATCH = 1024 * 1024


@dataclass
class _RunningHash:
    offset: int
    sha256: "hashlib._Hash" = field(default_factory=hashlib.sha256)


@dataclass(frozen=True)
class UploadSession:
    id: str
    repo: str
    created: float
    directory: Path

    @property
    def data_path(self) -> Path:
        return self.directory / "data"


class UploadManager:
    def __init__(self, root: Path, store: BlobStore, node_id: str = "", id_suffix: str = "0" * 8,
                 max_blob_size: int | None = None):
        self.id_suffix = id_suffix
        self.max_blob_size = max_blob_size
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.node_id = node_id
        self._hashes: dict[str, _RunningHash] = {}
        self._locks: dict[str, anyio.Lock] = {}

    def new_id(self) -> str:
        return uuid.uuid4().hex + self.id_suffix

    async def create(self, repo: str) -> UploadSession:
        upload_id = self.new_id()
        session = UploadSession(upload_id, repo, time.time(), self.root / upload_id)
        await anyio.to_thread.run_sync(self._create_on_disk, session)
        self._hashes[session.id] = _RunningHash(0)
        return session

    def _create_on_disk(self, session: UploadSession) -> None:
        session.directory.mkdir()
        meta = json.dumps({"repo": session.repo, "created": session.created, "node": self.node_id})
        with open(session.directory / "meta.json", "w") as f:
            f.write(meta)
            f.flush()
            os.fsync(f.fileno())
        open(session.data_path, "wb").close()
        fsync_directory(session.directory)
        fsync_directory(self.root)

    async def get(self, repo: str, upload_id: str) -> UploadSession:
        validate_upload_id(upload_id)
        directory = self.root / upload_id
        try:
            meta = json.loads(await anyio.to_thread.run_sync((directory / "meta.json").read_text))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            raise errors.blob_upload_unknown(detail={"uuid": upload_id}) from None
        if meta.get("repo") != repo:
            raise errors.blob_upload_unknown(detail={"uuid": upload_id})
        return UploadSession(upload_id, repo, meta.get("created", 0.0), directory)

    async def size(self, session: UploadSession) -> int:
        try:
            return os.stat(session.data_path).st_size
        except FileNotFoundError:
            raise errors.blob_upload_unknown(detail={"uuid": session.id}) from None

    def _lock(self, upload_id: str) -> anyio.Lock:
        lock = self._locks.get(upload_id)
        if lock is None:
            lock = self._locks[upload_id] = anyio.Lock()
        return lock

    async def append(self, session: UploadSession, body: AsyncIterator[bytes], *,
                     start: int | None = None, length: int | None = None) -> int:
        """Append a chunk; `start` (from Content-Range) must be the current offset. Returns the new size."""
        async with self._lock(session.id):
            offset = await self.size(session)
            if start is not None and start != offset:
                raise errors.range_invalid(
                    f"chunk starts at {start} but the upload has {offset} bytes",
                    headers=range_headers(session, offset))
            running = self._hashes.get(session.id)
            if running is not None and running.offset != offset:
                running = None  # out of step (e.g. an earlier write failed): rehash at the end
            if self.max_blob_size is not None and offset + (length or 0) > self.max_blob_size:
                raise _too_large(self.max_blob_size)
            written = await self._write_body(session, body, running, length, offset)
            self._hashes[session.id] = running if running is not None else _RunningHash(-1)
            if length is not None and written != length:
                raise errors.size_invalid(f"received {written} bytes, expected {length}")
            return offset + written

    async def _write_body(self, session: UploadSession, body: AsyncIterator[bytes],
                          running: _RunningHash | None, limit: int | None, offset: int = 0) -> int:
        f = await anyio.to_thread.run_sync(open, session.data_path, "ab")
        written = 0
        try:
            batch: list[bytes] = []
            batched = 0
            async for chunk in body:
                if limit is not None and written + batched + len(chunk) > limit:
                    raise errors.size_invalid("body is longer than the declared length")
                if self.max_blob_size is not None and offset + written + batched + len(chunk) > self.max_blob_size:
                    raise _too_large(self.max_blob_size)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    await anyio.to_thread.run_sync(_write_and_hash, f, batch, running)
                    written += batched
                    batch, batched = [], 0
            if batch:
                await anyio.to_thread.run_sync(_write_and_hash, f, batch, running)
                written += batched
            await anyio.to_thread.run_sync(_flush_and_sync, f)
        finally:
            f.close()
        return written

    async def complete(self, session: UploadSession, digest: Digest) -> int:
        """Verify the upload against `digest` and move it into the blob store. Returns the size."""
        async with self._lock(session.id):
            size = await self.size(session)
            running = self._hashes.get(session.id)
            if digest.algorithm == "sha256" and running is not None and running.offset == size:
                actual = running.sha256.hexdigest()
            else:
                actual = await anyio.to_thread.run_sync(hash_file, session.data_path, digest)
            if actual != digest.hex:
                await self._remove(session)
                raise errors.digest_invalid(detail={"digest": str(digest), "actual": f"{digest.algorithm}:{actual}"})
            await self.store.ingest(digest, session.data_path)
            await self._remove(session)
            return size

    async def cancel(self, session: UploadSession) -> None:
        async with self._lock(session.id):
            await self._remove(session)

    async def _remove(self, session: UploadSession) -> None:
        self._hashes.pop(session.id, None)
        self._locks.pop(session.id, None)
        await anyio.to_thread.run_sync(shutil.rmtree, session.directory, True)

    async def purge_older_than(self, max_age: float) -> int:
        """Remove sessions abandoned for longer than `max_age` seconds (by last write)."""
        cutoff = time.time() - max_age
        stale = await anyio.to_thread.run_sync(self._stale_sessions, cutoff)
        removed = 0
        for directory in stale:
            if directory.name not in self._locks:      # in use right now: not abandoned
                await anyio.to_thread.run_sync(shutil.rmtree, directory, True)
                removed += 1
        return removed

    def _stale_sessions(self, cutoff: float) -> list[Path]:
        stale = []
        for directory in self.root.iterdir():
            try:
                last_write = os.stat(directory / "data").st_mtime
            except FileNotFoundError:
                last_write = 0.0
            if last_write < cutoff:
                stale.append(directory)
        return stale


def _too_large(limit: int) -> errors.RegistryError:
    return errors.RegistryError("SIZE_INVALID", f"blobs are limited to {limit} bytes here", 413)


def _write_and_hash(f, batch: list[bytes], running: _RunningHash | None) -> None:
    # Writing and hashing in the same thread call keeps file and hash in step even when the
    # waiting task is cancelled: the call always runs to its end.
    data = b"".join(batch) if len(batch) > 1 else batch[0]
    f.write(data)
    if running is not None:
        running.sha256.update(data)
        running.offset += len(data)


def _flush_and_sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def range_headers(session: UploadSession, size: int) -> dict[str, str]:
    """Where the upload is and how much of it the node holds (OCI: `Range: 0-<last byte>`)."""
    return {
        "Location": f"/v2/{session.repo}/blobs/uploads/{session.id}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": session.id,
    }
