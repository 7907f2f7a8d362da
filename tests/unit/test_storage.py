"""The shared blob-store suite: every BlobStore backend must pass it (one factory per backend)."""

import os

import pytest

from cargohold.node import errors
from cargohold.node.reference import Digest
from cargohold.node.storage import FilesystemBlobStore

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

    digest = Digest.of(b"inventoried")
    await store.write(digest, b"inventoried")
    assert [d for d, _ in store.inventory()] == [digest]
    order = []

    async def holder(name):
        async with store.locked(digest):
            order.append(f"{name}-in")
            await anyio.sleep(0.05)
            order.append(f"{name}-out")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder, "a")
        tg.start_soon(holder, "b")
    assert order in (["a-in", "a-out", "b-in", "b-out"], ["b-in", "b-out", "a-in", "a-out"])
