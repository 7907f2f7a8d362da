"""The private etcd that ``cargohold serve`` starts without ``--etcd``."""

from __future__ import annotations

import anyio
import pytest

from cargohold.coordinator.embedded import embedded_etcd, etcd_healthy
from cargohold.coordinator.etcd import EtcdClient


pytestmark = pytest.mark.anyio


async def test_starts_stops_and_keeps_its_socket(tmp_path):
    async with embedded_etcd(tmp_path) as url:
        assert url == f"unix://{tmp_path.resolve()}/etcd/client:2379"
        async with EtcdClient([url]) as client:
            await client.put("k", b"kept")
    assert not await anyio.to_thread.run_sync(etcd_healthy, url)
    state = tmp_path / "etcd"
    assert (state / "etcd.log").stat().st_size > 0 and (state / "bootstrapped").exists()

    async with embedded_etcd(tmp_path) as again:
        assert again == url
        async with EtcdClient([again]) as client:
            assert (await client.get("k")).value == b"kept"


async def test_start_is_cancellable_and_stops_etcd(tmp_path):
    with anyio.move_on_after(0.05):
        async with embedded_etcd(tmp_path):
            pytest.fail("etcd cannot be ready this fast")  # pragma: no cover
    assert not (tmp_path / "etcd" / "bootstrapped").exists()  # so the half-made data dir is dropped
    assert not await anyio.to_thread.run_sync(etcd_healthy, f"unix://{tmp_path}/etcd/client:2379")
    async with embedded_etcd(tmp_path) as url:  # and the data dir is still usable
        assert await anyio.to_thread.run_sync(etcd_healthy, url)


async def test_early_exit_and_missing_binary_are_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code"):
        async with embedded_etcd(tmp_path, etcd_binary="false"):
            pass  # pragma: no cover
    with pytest.raises(RuntimeError, match="not found"):
        async with embedded_etcd(tmp_path, etcd_binary="no-such-etcd-binary"):
            pass  # pragma: no cover
