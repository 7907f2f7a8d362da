"""Fixtures of the coordinator tests: a client of the session's etcd, a fresh key prefix, and
both anyio backends (a module may pick one by defining its own `anyio_backend`)."""

from __future__ import annotations

import uuid

import pytest

from cargohold.coordinator.etcd import EtcdClient


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


@pytest.fixture
async def etcd_client(etcd):
    async with EtcdClient([etcd.url], retry_timeout=5.0) as client:
        yield client


@pytest.fixture
def prefix() -> str:
    return f"/test-etcd/{uuid.uuid4().hex[:12]}/"
