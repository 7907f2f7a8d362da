"""Issue 12, item 7: abandoned upload sessions are purged (files and memory) even after a chunk
arrived, each account has a cap on open sessions, and a session records who opened it."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from cargohold.blobs.store import FilesystemBlobStore
from cargohold.config import Settings
from cargohold.node.uploads import UploadManager
from cargohold.oci import errors
from cargohold.units import parse_size
from tests.conftest import RUNTIMES
from tests.security.conftest import node_with_settings
from tests.support.poll import until

pytestmark = pytest.mark.anyio


async def chunks(*parts):
    for part in parts:
        yield part


def _age(session, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(session.data_path, (then, then))


async def test_a_session_with_chunks_is_purged_with_its_memory(tmp_path):
    manager = UploadManager(tmp_path / "uploads", FilesystemBlobStore(tmp_path))
    idle = await manager.create("repo", "alice", "10.0.0.1")
    await manager.append(idle, chunks(b"first chunk"))
    busy = await manager.create("repo", "alice", "10.0.0.1")
    await manager.append(busy, chunks(b"x"))
    _age(idle, 3600)
    assert await manager.purge_idle(1800) == 1
    assert not idle.directory.exists() and busy.directory.exists()
    assert idle.id not in manager._hashes and idle.id not in manager._locks
    assert manager._open == {"alice": {busy.id}}


async def test_a_session_being_written_is_not_purged(tmp_path):
    manager = UploadManager(tmp_path / "uploads", FilesystemBlobStore(tmp_path))
    session = await manager.create("repo")
    _age(session, 3600)
    async with manager._lock(session.id):
        assert await manager.purge_idle(1800) == 0
    assert session.directory.exists()


async def test_open_sessions_are_capped_per_account(tmp_path):
    manager = UploadManager(tmp_path / "uploads", FilesystemBlobStore(tmp_path), max_per_account=3)
    opened = [await manager.create("repo", "ci", "10.0.0.1") for _ in range(3)]
    with pytest.raises(errors.RegistryError) as info:
        await manager.create("repo", "ci", "10.0.0.2")
    assert info.value.status == 429 and info.value.code == "TOOMANYREQUESTS"
    await manager.create("repo", "bob", "10.0.0.1")                 # another account is not affected
    for _ in range(3):
        await manager.create("repo", "", "10.0.0.9")                # anonymous: per client address
    await manager.create("repo", "", "10.0.0.8")
    await manager.cancel(opened[0])                                 # a closed session frees its place
    await manager.create("repo", "ci", "10.0.0.1")
    restarted = UploadManager(tmp_path / "uploads", FilesystemBlobStore(tmp_path), max_per_account=3)
    with pytest.raises(errors.RegistryError):                       # counted again after a restart
        await restarted.create("repo", "ci", "10.0.0.1")


async def test_a_session_records_who_opened_it(tmp_path):
    manager = UploadManager(tmp_path / "uploads", FilesystemBlobStore(tmp_path))
    session = await manager.create("repo", "robot$ci", "10.0.0.1")
    meta = json.loads((session.directory / "meta.json").read_text())
    assert meta["account"] == "robot$ci" and meta["client"] == "10.0.0.1"
    assert (await manager.get("repo", session.id, account="robot$ci")).account == "robot$ci"


def test_defaults_expire_idle_sessions_in_a_day_and_limit_blob_size():
    settings = Settings()
    assert settings.upload_expiry == 24 * 3600 and settings.max_uploads_per_account == 1000
    assert parse_size(settings.max_blob_size) == 32 << 30


# ---------------------------------------------------------------------- through a node

EXPIRY = 5.0
CAP = 3


@pytest.fixture(scope="module", params=RUNTIMES)
def node(request, tmp_path_factory, etcd, cluster_name):
    settings = f"upload_expiry: {EXPIRY}\nmax_uploads_per_account: {CAP}\n"
    with node_with_settings(request, tmp_path_factory, etcd, cluster_name, settings) as proc:
        yield proc


def test_an_abandoned_upload_with_a_chunk_is_purged_while_the_node_runs(node):
    with httpx.Client(base_url=node.url, timeout=10) as client:
        location = client.post("/v2/abandoned/blobs/uploads/").headers["location"]
        assert client.patch(location, content=b"a chunk").status_code == 202
        files = node.data_dir / "uploads" / location.rsplit("/", 1)[1]
        # The session is unknown once its meta.json is gone, a moment before the rest of its
        # directory: wait for both.
        until(lambda: client.get(location).status_code == 404 and not files.exists(),
              what="the idle session and its files are purged")


def test_open_upload_sessions_are_capped(node):
    with httpx.Client(base_url=node.url, timeout=10) as client:
        answers = [client.post("/v2/capped/blobs/uploads/") for _ in range(CAP + 1)]
        assert [a.status_code for a in answers] == [202] * CAP + [429]
        assert answers[-1].json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert client.delete(answers[0].headers["location"]).status_code == 204
        assert client.post("/v2/capped/blobs/uploads/").status_code == 202
