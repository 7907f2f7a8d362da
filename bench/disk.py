"""How fast this machine's disk takes writes, measured in the same run as a transfer (cluster and
sites compare replication speed with it)."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 1 << 20
MB = 1_000_000


def blob_pattern_speed(directory: Path, count: int, size: int, writers: int) -> float:
    """MB/s of the store's write pattern for fetched blobs: ``writers`` threads each writing
    ``size``-byte files to a staging dir, fsync, rename into a fan-out dir, fsync that dir."""
    root = directory / "blob-pattern"
    (root / "staging").mkdir(parents=True, exist_ok=True)
    data = random.Random("pattern").randbytes(size)

    def one(i: int) -> None:
        staging = root / "staging" / f"{i}"
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        d = root / "blobs" / f"{i % 256:02x}"
        d.mkdir(parents=True, exist_ok=True)
        os.replace(staging, d / f"{i}")
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(writers) as ex:
        list(ex.map(one, range(count)))
    seconds = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    return count * size / seconds / MB


def fsync_write_speed(directory: Path, total: int, chunk: int = 8 * MiB) -> float:
    """MB/s writing ``total`` bytes in ``chunk`` writes to a new file, fsync included."""
    path = directory / "disk-speed.tmp"
    block = random.Random("disk").randbytes(chunk)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = total
        while left > 0:
            left -= os.write(fd, block[:min(chunk, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return total / seconds / MB


def device_write_speed(directory: Path, total: int, chunk: int = 8 * MiB) -> float | None:
    """MB/s writing ``total`` bytes with O_DIRECT from one reused aligned buffer, fsync included:
    the device itself, without the page cache (whose fresh pages cost this VM more CPU than the
    copy, which makes the buffered figure swing between ~350 and ~1,700 MB/s). None where the
    file system refuses O_DIRECT."""
    path = directory / "device-speed.tmp"
    buffer = mmap.mmap(-1, chunk)
    buffer.write(random.Random("device").randbytes(chunk))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return None
    t0 = time.perf_counter()
    try:
        left = total
        while left > 0:
            left -= os.write(fd, buffer)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()
    seconds = time.perf_counter() - t0
    path.unlink()
    return total / seconds / MB
