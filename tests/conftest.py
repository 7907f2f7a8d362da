"""Shared fixtures: one etcd for the session, a cargohold node per test module.

* ``etcd`` (session): an ``EtcdProcess`` in a temp dir; every module uses its own
  ``--cluster`` name, so the modules are isolated by key prefix.
* ``node`` (module, parametrized over the server runtimes ``asyncio`` and ``trio``):
  a started ``NodeProcess``; tests that restart it leave it running.
* ``client``: an ``httpx.AsyncClient`` with ``base_url=node.url``.
* ``anyio_backend`` is "trio": the suite runs on trio.

Set ``CARGOHOLD_TEST_REGISTRY=http://HOST:PORT`` to run the API tests against some
other registry (for instance CNCF Distribution) instead of starting cargohold; tests
that need to restart or kill the node are skipped then.
"""

from __future__ import annotations

import os
import re
import uuid

import httpx
import pytest

from tests.support.node import NodeProcess

RUNTIMES = ["asyncio", "trio"]
EXTERNAL_REGISTRY = os.environ.get("CARGOHOLD_TEST_REGISTRY")


@pytest.fixture(scope="session")
def anyio_backend():
    return "trio"


class ExternalRegistry:
    """Stands in for a NodeProcess when the tests target an already running registry."""

    runtime = "external"

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.host_port = httpx.URL(self.url).netloc.decode()
        self.data_dir = None

    def _unsupported(self, *a, **k):
        pytest.skip("needs a cargohold node process (CARGOHOLD_TEST_REGISTRY is set)")

    restart = stop = kill = start = _unsupported

    def log_tail(self, lines: int = 60) -> str:
        return "(external registry: no log)"


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    from tests.support.etcd import EtcdProcess

    proc = EtcdProcess(tmp_path_factory.mktemp("etcd-session"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@pytest.fixture(scope="module")
def cluster_name(request) -> str:
    """A cluster name (etcd key prefix) unique to this module and this session."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    return f"t-{_slug(module)}-{uuid.uuid4().hex[:8]}"


def node_params():
    return ["external"] if EXTERNAL_REGISTRY else RUNTIMES


@pytest.fixture(scope="module", params=node_params())
def node(request, tmp_path_factory, cluster_name):
    """A running single node for this module, once per server runtime."""
    if request.param == "external":
        yield ExternalRegistry(EXTERNAL_REGISTRY)
        return
    etcd = request.getfixturevalue("etcd")
    runtime = request.param
    data_dir = tmp_path_factory.mktemp(f"node-{runtime}")
    proc = NodeProcess(data_dir, etcd_url=etcd.url, cluster=f"{cluster_name}-{runtime}",
                       node_id="n1", runtime=runtime)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def registry_url(node) -> str:
    """``http://127.0.0.1:PORT`` of the node under test."""
    return node.url


@pytest.fixture
def registry_host(node) -> str:
    """``127.0.0.1:PORT``: the registry host as image references spell it."""
    return node.host_port


@pytest.fixture
async def client(node):
    async with httpx.AsyncClient(base_url=node.url, timeout=httpx.Timeout(30.0)) as c:
        yield c


@pytest.fixture
def repo(request) -> str:
    """A fresh repository name for one test (valid per the spec's name grammar)."""
    return f"test/{_slug(request.node.originalname)[:60]}-{uuid.uuid4().hex[:8]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the node's log tail to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        node = item.funcargs.get("node")
        if node is not None and hasattr(node, "log_tail"):
            report.sections.append(("cargohold node log (tail)", node.log_tail(40)))
