import hashlib
import os

import pytest

from cargohold.oci import errors
from cargohold.oci.reference import Digest
from cargohold.blobs.store import FilesystemBlobStore
from cargohold.node.uploads import UploadManager

pytestmark = pytest.mark.anyio


async def chunks(*parts):
    for part in parts:
        yield part


@pytest.fixture
def manager(tmp_path):
    return UploadManager(tmp_path / "uploads", FilesystemBlobStore(tmp_path))


async def test_chunked_upload_completes_with_running_hash(manager):
    data = os.urandom(3 * 1024 * 1024)
    session = await manager.create("repo")
    assert await manager.append(session, chunks(data[:1000]), start=0, length=1000) == 1000
    assert await manager.append(session, chunks(data[1000:2000000], data[2000000:]), start=1000) == len(data)
    digest = Digest.of(data)
    assert await manager.complete(session, digest) == len(data)
    assert await manager.store.read_all(digest) == data
    assert not session.directory.exists()


async def test_out_of_order_chunk_is_416_and_changes_nothing(manager):
    session = await manager.create("repo")
    await manager.append(session, chunks(b"abc"))
    with pytest.raises(errors.RegistryError) as info:
        await manager.append(session, chunks(b"zzz"), start=5)
    assert info.value.status == 416 and info.value.headers["Range"] == "0-2"
    assert await manager.size(session) == 3


async def test_resume_after_restart_rehashes(tmp_path):
    store = FilesystemBlobStore(tmp_path)
    first = UploadManager(tmp_path / "uploads", store)
    session = await first.create("repo")
    await first.append(session, chunks(b"hello "))
    second = UploadManager(tmp_path / "uploads", store)       # a restarted node
    resumed = await second.get("repo", session.id)
    assert await second.size(resumed) == 6
    await second.append(resumed, chunks(b"world"), start=6)
    digest = Digest("sha512", hashlib.sha512(b"hello world").hexdigest())
    await second.complete(resumed, digest)
    assert await store.read_all(digest) == b"hello world"


async def test_wrong_digest_removes_session_and_stores_nothing(manager):
    session = await manager.create("repo")
    await manager.append(session, chunks(b"data"))
    wrong = Digest.of(b"other")
    with pytest.raises(errors.RegistryError) as info:
        await manager.complete(session, wrong)
    assert info.value.code == "DIGEST_INVALID"
    assert await manager.store.stat(wrong) is None and await manager.store.stat(Digest.of(b"data")) is None
    with pytest.raises(errors.RegistryError):
        await manager.get("repo", session.id)


async def test_session_belongs_to_its_repository(manager):
    session = await manager.create("repo")
    with pytest.raises(errors.RegistryError) as info:
        await manager.get("other", session.id)
    assert info.value.code == "BLOB_UPLOAD_UNKNOWN"


async def test_declared_length_mismatch(manager):
    session = await manager.create("repo")
    with pytest.raises(errors.RegistryError) as info:
        await manager.append(session, chunks(b"abcdef"), length=3)
    assert info.value.code == "SIZE_INVALID"
