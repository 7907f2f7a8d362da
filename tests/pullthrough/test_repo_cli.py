"""`cargohold repo add|list|show|remove|status` against a real etcd and a running node."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import anyio
import pytest

from cargohold.cli.repos import STATUS_FIGURES, cache_figures
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from tests.cluster.conftest import client_for, cluster  # noqa: F401  (the multi-node fixture)
from tests.support import oci
from tests.support.node import REPO_ROOT, free_port
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

PASSWORD = "upstream-s3cret-Pa55"
ENGINE_WIRED = importlib.util.find_spec("cargohold.pullthrough.cache") is not None


def repo(cluster, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """`cargohold repo ARGS` for this cluster; the password check runs on every call's output."""
    result = subprocess.run([sys.executable, "-m", "cargohold", "repo", *args, "--etcd", cluster.etcd_url,
                             "--cluster", cluster.name], input=input, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert PASSWORD not in result.stdout + result.stderr, "a command printed the upstream password"
    return result


def refused(result: subprocess.CompletedProcess, code: int, *words: str) -> bool:
    """Exit code `code` and one line on stderr that says why."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr)
    assert all(word in lines[0] for word in words), lines[0]
    return True


def upstream() -> str:
    return f"http://127.0.0.1:{free_port()}"      # nobody listens: nothing leaves the machine


async def test_add_list_show_replace_remove(cluster):  # noqa: F811
    cluster.add("a")
    url = upstream()
    added = repo(cluster, "add", "hub", "--remote", url, "--username", "bob", "--password-stdin", "--ttl", "10m",
                 "--include", "library/**", "--exclude", "library/evil", "--offline-period", "30s",
                 "--evict-unused-after", "30d", "--mirror-for", "docker.io", input=PASSWORD + "\n")
    assert added.returncode == 0 and "added remote repository hub" in added.stdout, added.stderr

    shown = json.loads(repo(cluster, "show", "hub", "--json").stdout)
    assert shown["url"] == url and shown["ttl"] == 600 and shown["offline_period"] == 30
    assert shown["evict_unused_after"] == 30 * 86400 and shown["include"] == ["library/**"]
    assert shown["exclude"] == ["library/evil"] and "docker.io" in shown["mirror_for"]
    assert shown["credentials"] == "user bob" and "password" not in shown
    text = repo(cluster, "show", "hub").stdout
    assert "url: " + url in text and "credentials: user bob" in text
    listed = repo(cluster, "list", "--json")
    assert [r["name"] for r in json.loads(listed.stdout)] == ["hub"]
    table = repo(cluster, "list").stdout
    assert "hub" in table and "10m" in table and "30d" in table

    # The password is stored for the nodes (they fetch with it), exactly as given.
    async with EtcdClient([cluster.etcd_url]) as client:
        stored = await ClusterMetadata(client, cluster.name, "test").stored_definitions()
    assert stored["hub"].password == PASSWORD and stored["hub"].username == "bob"

    changed = repo(cluster, "add", "hub", "--remote", url, "--ttl", "30s", "--replace")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(repo(cluster, "show", "hub", "--json").stdout)["ttl"] == 30
    assert refused(repo(cluster, "add", "other", "--remote", url, "--replace"), 1, "no remote repository other")

    assert repo(cluster, "remove", "hub").returncode == 0
    assert json.loads(repo(cluster, "list", "--json").stdout) == []
    assert refused(repo(cluster, "show", "hub"), 1, "no remote repository hub")
    assert refused(repo(cluster, "remove", "hub"), 1, "no remote repository hub")


async def test_refusals_are_one_clear_line(cluster):  # noqa: F811
    node = cluster.add("a")
    async with client_for(node) as client:
        await oci.push_image(client, "team/app", "v1", oci.build_image("local-content", layers=1))
    url = upstream()
    assert repo(cluster, "add", "hub", "--remote", url, "--docker-mirror").returncode == 0

    assert refused(repo(cluster, "add", "hub", "--remote", url), 1, "exists", "--replace")
    assert refused(repo(cluster, "add", "hub/inner", "--remote", url), 1, "nest", "hub")
    assert refused(repo(cluster, "add", "team", "--remote", url), 1, "local repositories", "team/app")
    assert refused(repo(cluster, "add", "team/app", "--remote", url), 1, "local repository")
    assert refused(repo(cluster, "add", "dh", "--remote", url, "--docker-mirror"), 1, "hub", "registry-mirrors")
    for bad in ("ftp://r.example", "registry.example", "https://r.example/v2/", "https://u:p@r.example"):
        assert refused(repo(cluster, "add", "bad", "--remote", bad), 2), bad
    assert refused(repo(cluster, "add", "bad", "--remote", url, "--ttl", "soon"), 2, "--ttl")
    assert refused(repo(cluster, "add", "bad", "--remote", url, "--evict-unused-after", "0s"), 2, "evict")
    assert refused(repo(cluster, "add", "bad", "--remote", url, "--password-stdin", input=PASSWORD), 2, "--username")
    assert refused(repo(cluster, "add", "Bad", "--remote", url), 2, "not a valid repository name")
    assert refused(repo(cluster, "status", "nope"), 1, "no remote repository nope")
    assert [r["name"] for r in json.loads(repo(cluster, "list", "--json").stdout)] == ["hub"]


async def test_nodes_follow_a_definition_without_restart(cluster):  # noqa: F811
    """What a node does: its read model (the same ClusterMetadata, following the watch) shows a
    definition added and removed by the CLI; with the pull-through engine wired, the running node
    refuses a push into the namespace."""
    node = cluster.add("a")
    async with EtcdClient([cluster.etcd_url]) as client:
        follower = ClusterMetadata(client, cluster.name, "follower")
        async with anyio.create_task_group() as tg:
            await tg.start(follower.run)
            assert repo(cluster, "add", "hub", "--remote", upstream(), "--ttl", "1m").returncode == 0
            await eventually(lambda: "hub" in follower.repository_definitions(), what="the watch to bring hub")
            assert follower.repository_definitions()["hub"].ttl == 60
            if ENGINE_WIRED:
                async with client_for(node) as c:
                    r = await c.post("/v2/hub/library/x/blobs/uploads/")
                    assert r.status_code == 403 and "read-only cache" in r.text, oci.describe(r)
            assert repo(cluster, "remove", "hub").returncode == 0
            await eventually(lambda: "hub" not in follower.repository_definitions(), what="the removal")
            tg.cancel_scope.cancel()


async def test_status_sums_the_live_nodes(cluster):  # noqa: F811
    cluster.add("a")
    assert repo(cluster, "add", "hub", "--remote", upstream()).returncode == 0
    shown = json.loads(repo(cluster, "status", "--json").stdout)
    assert shown == {"hub": dict.fromkeys(STATUS_FIGURES, 0)}
    assert json.loads(repo(cluster, "status", "hub", "--json").stdout) == shown
    table = repo(cluster, "status").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "HITS", "MISSES"] and table[1].split()[0] == "hub"


def test_cache_figures_add_up_per_repository_over_live_nodes_only():
    class Published:                     # the two read-model views cache_figures reads
        def alive(self):
            return {"a", "b"}

        def node_status(self):
            return {"a": {"pullthrough": {"hub": {"hits": 3, "misses": 1, "bytes_from_upstream": 100}}},
                    "b": {"pullthrough": {"hub": {"hits": 2, "stale": 1}, "quay": {"misses": 4}}},
                    "dead": {"pullthrough": {"hub": {"hits": 1000}}},
                    "c": {"queued": 1}}

    figures = cache_figures(Published(), ["hub", "quay", "idle"])
    assert figures["hub"]["hits"] == 5 and figures["hub"]["misses"] == 1 and figures["hub"]["stale"] == 1
    assert figures["hub"]["bytes_from_upstream"] == 100 and figures["quay"]["misses"] == 4
    assert figures["idle"] == dict.fromkeys(STATUS_FIGURES, 0)
