"""Blob upload sessions on local disk.

A session is a directory `uploads/<id>/` with `meta.json` (written and fsynced at creation)
and `data` (the bytes received so far, fsynced before each chunk is acknowledged). Sessions
survive a restart: the offset is the size of `data`. The running hash lives in memory; after
a restart the file is hashed again when the upload completes.

`meta.json` names the account that opened the session (its login; "" for anonymous, with the
client address): each account may hold `max_per_account` open sessions on this node (anonymous
callers: per client address), and a session idle for `upload_expiry` is removed with its
in-memory state (`purge_idle`).
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
    account: str = ""            # the login that opened it; "" for anonymous

    @property
    def data_path(self) -> Path:
        return self.directory / "data"


class UploadManager:
    def __init__(self, root: Path, store: BlobStore, node_id: str = "", id_suffix: str = "0" * 8,
                 max_blob_size: int | None = None, max_per_account: int | None = None):
        self.id_suffix = id_suffix
        self.max_blob_size = max_blob_size
        self.max_per_account = max_per_account
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.node_id = node_id
        self._hashes: dict[str, _RunningHash] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._open: dict[str, set[str]] = _open_sessions_on_disk(self.root)   # quota key -> session ids

    def new_id(self) -> str:
        return uuid.uuid4().hex + self.id_suffix

    async def create(self, repo: str, account: str = "", client: str = "-") -> UploadSession:
        """A new session opened by `account` (a login; "" for anonymous, counted per `client`)."""
        key = _quota_key(account, client)
        opened = self._open.setdefault(key, set())
        if self.max_per_account is not None and len(opened) >= self.max_per_account:
            raise errors.RegistryError("TOOMANYREQUESTS", f"{self.max_per_account} upload sessions are open for "
                                       "this account already: finish or cancel some", 429, headers={"Retry-After": "60"})
        upload_id = self.new_id()
        opened.add(upload_id)       # before the thread trip: concurrent creates count each other
        session = UploadSession(upload_id, repo, time.time(), self.root / upload_id, account)
        try:
            await anyio.to_thread.run_sync(self._create_on_disk, session, client)
        except BaseException:
            opened.discard(upload_id)
            raise
        self._hashes[session.id] = _RunningHash(0)
        return session

    def _create_on_disk(self, session: UploadSession, client: str) -> None:
        session.directory.mkdir()
        meta = json.dumps({"repo": session.repo, "created": session.created, "node": self.node_id,
                           "account": session.account, "client": client})
        with open(session.directory / "meta.json", "w") as f:
            f.write(meta)
            f.flush()
            os.fsync(f.fileno())
        open(session.data_path, "wb").close()
        fsync_directory(session.directory)
        fsync_directory(self.root)

    async def get(self, repo: str, upload_id: str, account: str = "") -> UploadSession:
        """The session `account` opened in `repo` ("" for anonymous). Any other repository or
        account gets BLOB_UPLOAD_UNKNOWN: a session is bound to its opener, and unknown, not
        denied, reveals nothing about it."""
        validate_upload_id(upload_id)
        directory = self.root / upload_id
        try:
            meta = json.loads(await anyio.to_thread.run_sync((directory / "meta.json").read_text))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            raise errors.blob_upload_unknown(detail={"uuid": upload_id}) from None
        if meta.get("repo") != repo or meta.get("account", "") != account:
            raise errors.blob_upload_unknown(detail={"uuid": upload_id})
        return UploadSession(upload_id, repo, meta.get("created", 0.0), directory, meta.get("account", ""))

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
        await anyio.to_thread.run_sync(shutil.rmtree, session.directory, True)
        self._forget(session.id)

    def _forget(self, upload_id: str) -> None:
        """Drop the in-memory state of a session that is gone from disk."""
        self._hashes.pop(upload_id, None)
        self._locks.pop(upload_id, None)
        for key, opened in list(self._open.items()):
            opened.discard(upload_id)
            if not opened:
                del self._open[key]

    async def purge_idle(self, max_idle: float) -> int:
        """Remove sessions nobody has written to for `max_idle` seconds, and their memory.
        A session in use right now (its lock held) is left alone."""
        cutoff = time.time() - max_idle
        removed = 0
        for directory in await anyio.to_thread.run_sync(self._idle_sessions, cutoff):
            lock = self._lock(directory.name)
            if lock.locked():
                continue
            async with lock:       # an append that starts meanwhile waits, then finds no session
                if await anyio.to_thread.run_sync(_last_write, directory) >= cutoff:
                    continue       # written to just now
                await anyio.to_thread.run_sync(shutil.rmtree, directory, True)
            self._forget(directory.name)
            removed += 1
        return removed

    def _idle_sessions(self, cutoff: float) -> list[Path]:
        return [directory for directory in self.root.iterdir() if _last_write(directory) < cutoff]


def _last_write(directory: Path) -> float:
    try:
        return os.stat(directory / "data").st_mtime
    except FileNotFoundError:
        return 0.0


def _quota_key(account: str, client: str) -> str:
    return account or f"anonymous@{client}"


def _open_sessions_on_disk(root: Path) -> dict[str, set[str]]:
    """The sessions a previous run left open, by quota key (at start, before any request)."""
    opened: dict[str, set[str]] = {}
    for directory in root.iterdir():
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        key = _quota_key(meta.get("account", ""), meta.get("client", "-"))
        opened.setdefault(key, set()).add(directory.name)
    return opened


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
