"""The shared blob-store suite: every BlobStore backend must pass it (one factory per backend)."""

import os
import shutil

import pytest

from cargohold.oci import errors
from cargohold.oci.reference import Digest
from cargohold.blobs.store import FilesystemBlobStore

pytestmark = pytest.mark.anyio

BACKENDS = {"filesystem": lambda root: FilesystemBlobStore(root)}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path):
    return BACKENDS[request.param](tmp_path)


async def collect(stream):
    return b"".join([chunk async for chunk in stream])


async def test_write_read_stat_delete(store):
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = Digest.of(data)
    assert await store.stat(digest) is None
    await store.write(digest, data)
    assert await store.stat(digest) == len(data)
    assert await collect(store.read(digest)) == data
    assert await collect(store.read(digest, 10, 100)) == data[10:110]
    assert await store.read_all(digest) == data
    assert await store.delete(digest) is True
    assert await store.delete(digest) is False
    with pytest.raises(errors.RegistryError):
        await collect(store.read(digest))


async def test_wrong_digest_stores_nothing(store):
    digest = Digest.of(b"right")
    with pytest.raises(errors.RegistryError) as info:
        await store.write(digest, b"wrong")
    assert info.value.code == "DIGEST_INVALID"
    assert await store.stat(digest) is None


async def test_sha512_and_idempotent_write(store):
    digest = Digest.of(b"x" * 1000, "sha512")
    await store.write(digest, b"x" * 1000)
    await store.write(digest, b"x" * 1000)
    assert await store.read_all(digest) == b"x" * 1000


async def test_ingest_moves_a_verified_file(store):
    data = b"ingested" * 1000
    digest = Digest.of(data)
    staged = store.staging_path()
    staged.write_bytes(data)
    await store.ingest(digest, staged)
    assert not staged.exists()
    assert await store.read_all(digest) == data


async def test_leftover_staging_files_are_cleared_on_open(tmp_path):
    first = FilesystemBlobStore(tmp_path)
    leftover = first.staging_path()
    leftover.write_bytes(b"half written")
    FilesystemBlobStore(tmp_path)
    assert not leftover.exists()


async def test_inventory_and_per_digest_lock(store):
    import anyio

    from tests.support.poll import eventually

    digest = Digest.of(b"inventoried")
    await store.write(digest, b"inventoried")
    assert [d for d, _ in store.inventory()] == [digest]
    order, asked = [], []

    async def holder(name):
        asked.append(name)
        async with store.locked(digest):
            order.append(f"{name}-in")
            # stay inside until the other holder has asked for the lock too
            await eventually(lambda: len(asked) == 2, what="the other holder to ask")
            order.append(f"{name}-out")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder, "a")
        tg.start_soon(holder, "b")
    assert order in (["a-in", "a-out", "b-in", "b-out"], ["b-in", "b-out", "a-in", "a-out"])


def test_write_behind_keeps_a_sequentially_written_file_intact(tmp_path):
    """WriteBehind only starts writeback and drops written pages from the cache: the file's
    content is unchanged, and at most two windows are ever outside the dropped range."""
    from cargohold.blobs import store as storage

    window = 1024 * 1024
    parts = [os.urandom(300 * 1024) for _ in range(40)]
    path = tmp_path / "big"
    with open(path, "wb") as f:
        behind = storage.WriteBehind(f.fileno(), window=window)
        size = 0
        for part in parts:
            f.write(part)
            f.flush()
            size += len(part)
            behind.written(size)
            if storage._SYNC_FILE_RANGE is not None:
                assert size - behind.dropped < 3 * window
        f.flush()
        os.fsync(f.fileno())
    assert path.read_bytes() == b"".join(parts)
    if storage._SYNC_FILE_RANGE is not None:
        assert behind.started == size // window * window
        assert behind.dropped == behind.started - window


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("size, piece", [
    (0, 1), (1, 1), (4095, 1000), (4096, 4096), (4097, 4096), (1024 * 1024, 1024 * 1024),
    (1024 * 1024 + 3, 65536), (9 * 1024 * 1024 + 5, 1024 * 1024 + 7), (3 * 4096, 3 * 4096 - 1),
])
def test_staging_writer_writes_exactly_the_bytes_given(tmp_path, direct, size, piece):
    """Whatever the split of the bytes and however they fall on blocks and on the direct
    buffer, the finished file holds exactly them (the direct tail is padded, then cut back)."""
    from cargohold.blobs import store as storage

    data = os.urandom(size)
    path = tmp_path / "staged"
    writer = storage.StagingWriter(path, direct=direct)
    try:
        for start in range(0, size, piece):
            writer.write(data[start:start + piece])
        writer.finish()
        assert writer.size == size
    finally:
        writer.close()
    assert path.read_bytes() == data
    assert path.stat().st_size == size


def test_staging_writer_bypasses_the_page_cache_where_it_can(tmp_path):
    """On a file system with O_DIRECT (this test's tmp dir on Linux ext4/xfs) the writer uses
    it; asked not to, it writes an ordinary buffered file. Its aligned buffer is reused."""
    from cargohold.blobs import store as storage

    if not storage._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    first = storage.StagingWriter(tmp_path / "a")
    if not first.direct:
        first.close()
        pytest.skip("the temp dir's file system refuses O_DIRECT")
    buffer = first._buffer
    first.write(b"x" * 10)
    first.finish()
    first.close()
    second = storage.StagingWriter(tmp_path / "b")
    assert second.direct and second._buffer is buffer
    second.close()
    buffered = storage.StagingWriter(tmp_path / "c", direct=False)
    assert not buffered.direct
    buffered.close()
    assert (tmp_path / "a").read_bytes() == b"x" * 10



def _resident_bytes(path) -> int:
    import subprocess
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


@pytest.mark.skipif(not shutil.which("fincore"), reason="fincore (util-linux) is not installed")
def test_a_writer_asked_to_keep_its_pages_cached_writes_behind_without_dropping(tmp_path):
    """A pull-through fill writes a blob its clients read again at once: written behind (the
    publishing fsync finds little left) but left in the page cache, unlike an upload's."""
    from cargohold.blobs import store as storage

    data = os.urandom(3 * storage.WRITE_BEHIND_WINDOW + 5)
    sizes = {}
    for name, options in {"kept": {"keep_cached": True}, "dropped": {"direct": False}}.items():
        writer = storage.StagingWriter(tmp_path / name, **options)
        assert not writer.direct
        for start in range(0, len(data), 1 << 20):
            writer.write(data[start:start + (1 << 20)])
        assert writer.visible() == len(data)
        writer.finish()
        writer.close()
        sizes[name] = _resident_bytes(tmp_path / name)     # (before reading it back caches it)
        assert (tmp_path / name).read_bytes() == data
    assert sizes["kept"] >= len(data) - 4096
    if storage._SYNC_FILE_RANGE is not None and not _on_tmpfs(tmp_path):
        assert sizes["dropped"] <= 2 * storage.WRITE_BEHIND_WINDOW + 4096


def _on_tmpfs(path) -> bool:
    import subprocess
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip() == "tmpfs"
