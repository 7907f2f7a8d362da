"""Fixtures for multi-node tests: N real node processes on one real etcd, one cluster name each."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
import pytest

from tests.support.node import REPO_ROOT, NodeProcess
from tests.support.poll import PATIENCE, until


class Cluster:
    def __init__(self, etcd_url: str, root, name: str):
        self.etcd_url = etcd_url
        self.root = root
        self.name = name
        self.nodes: dict[str, NodeProcess] = {}

    def add(self, node_id: str, *, settings: dict | None = None, start: bool = True, args=()) -> NodeProcess:
        data_dir = self.root / node_id
        data_dir.mkdir(parents=True, exist_ok=True)
        extra = list(args)
        if settings:
            config = data_dir / "config.json.yaml"
            config.write_text(json.dumps(settings))   # JSON is YAML
            extra += ["--config", str(config)]
        node = NodeProcess(data_dir, etcd_url=self.etcd_url, cluster=self.name, node_id=node_id,
                           extra_args=extra)
        self.nodes[node_id] = node
        if start:
            node.start()
        return node

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cargohold", *args, "--etcd", self.etcd_url,
                               "--cluster", self.name], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def node_list(self) -> dict[str, dict]:
        result = self.cli("node", "list", "--json")
        assert result.returncode == 0, result.stderr
        return {row["id"]: row for row in json.loads(result.stdout)}

    def holders(self) -> dict[str, set[str]]:
        """blob digest -> nodes that publish a copy, read from etcd through the admin snapshot."""
        script = ("import anyio, json, sys\n"
                  "from cargohold.coordinator.etcd import EtcdClient\n"
                  "from cargohold.replication.nodes import snapshot\n"
                  "async def main():\n"
                  "    async with EtcdClient([sys.argv[1]]) as c:\n"
                  "        m = await snapshot(c, sys.argv[2])\n"
                  "        print(json.dumps({d: sorted(s.nodes) for d, s in m.blob_states().items() if s.record}))\n"
                  "anyio.run(main, backend='trio')\n")
        out = subprocess.run([sys.executable, "-c", script, self.etcd_url, self.name], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
        return {d: set(nodes) for d, nodes in json.loads(out).items()}

    def wait_until(self, predicate, timeout: float = PATIENCE, what: str = "condition"):
        """`poll.until`, polling gently: each `holders()` / `node_list()` is a subprocess."""
        return until(predicate, timeout=timeout, interval=0.2, what=what)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.alive():
                node.kill()


@pytest.fixture
def cluster(etcd, tmp_path, request):
    name = f"c-{request.node.name[:30].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
    c = Cluster(etcd.url, tmp_path, name)
    yield c
    c.stop_all()


def client_for(node: NodeProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.url, timeout=60)
