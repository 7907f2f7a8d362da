"""Fixtures for the fault tests."""

from __future__ import annotations

import pytest

from tests.support.etcd import EtcdProcess


@pytest.fixture
def local_etcd(tmp_path):
    """An etcd of the test's own, which it may stop, kill and restart."""
    e = EtcdProcess(tmp_path / "etcd")
    e.start()
    try:
        yield e
    finally:
        e.stop()
