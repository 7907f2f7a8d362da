"""`cargohold repo add --virtual|list|show|remove` against a real etcd and a running node."""

from __future__ import annotations

import json

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.repositories.virtual import Member
from tests.cluster.conftest import client_for, cluster  # noqa: F401  (the multi-node fixture)
from tests.pullthrough.test_repo_cli import refused, repo, upstream
from tests.support import oci
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


def add_virtual(cluster, name: str, members: str, *flags: str):
    return repo(cluster, "add", name, "--virtual", "--members", members, *flags)


async def test_add_show_list_replace_remove(cluster):  # noqa: F811
    cluster.add("a")
    assert repo(cluster, "add", "hub", "--remote", upstream()).returncode == 0
    added = add_virtual(cluster, "dev", "team-a,hub", "--deploy-to", "team-a",
                        "--member-include", "hub=library/**", "--member-exclude", "hub=library/evil*")
    assert added.returncode == 0 and "added virtual repository dev over team-a, hub, pushes to team-a" in added.stdout

    shown = json.loads(repo(cluster, "show", "dev", "--json").stdout)
    assert shown == {"name": "dev", "kind": "virtual", "deploy_to": "team-a", "members": [
        {"name": "team-a", "include": [], "exclude": []},
        {"name": "hub", "include": ["library/**"], "exclude": ["library/evil*"]}]}
    text = repo(cluster, "show", "dev").stdout
    assert "members: team-a, hub[+library/** -library/evil*]" in text and "deploy_to: team-a" in text
    assert [(r["name"], r["kind"]) for r in json.loads(repo(cluster, "list", "--json").stdout)] == [
        ("dev", "virtual"), ("hub", "remote")]
    table = repo(cluster, "list").stdout.splitlines()
    assert table[1].split()[:3] == ["dev", "virtual", "team-a,hub[+library/**"] and table[1].endswith("team-a")

    changed = add_virtual(cluster, "dev", "hub,team-a", "--replace")
    assert changed.returncode == 0 and "no pushes" in changed.stdout, changed.stderr
    assert json.loads(repo(cluster, "show", "dev", "--json").stdout)["deploy_to"] is None
    assert refused(add_virtual(cluster, "other", "team-a", "--replace"), 1, "no virtual repository other")
    assert refused(add_virtual(cluster, "hub", "team-a", "--replace"), 1, "no virtual repository hub")

    removed = repo(cluster, "remove", "dev")
    assert removed.returncode == 0 and "removed virtual repository dev" in removed.stdout
    assert [r["name"] for r in json.loads(repo(cluster, "list", "--json").stdout)] == ["hub"]
    assert refused(repo(cluster, "show", "dev"), 1, "no remote repository dev")
    assert refused(repo(cluster, "remove", "dev"), 1, "dev")


async def test_nested_virtual_repositories_and_the_cycle_refusal(cluster):  # noqa: F811
    cluster.add("a")
    assert add_virtual(cluster, "inner", "team-b", "--deploy-to", "team-b").returncode == 0
    assert add_virtual(cluster, "outer", "team-a,inner", "--deploy-to", "inner").returncode == 0
    assert refused(add_virtual(cluster, "inner", "outer", "--replace"), 1,
                   "cycle", "inner -> outer -> inner")
    assert add_virtual(cluster, "plain", "team-c").returncode == 0             # no deployment target
    assert refused(add_virtual(cluster, "outer", "team-a,plain", "--replace", "--deploy-to", "plain"), 1,
                   "plain cannot take pushes")
    assert add_virtual(cluster, "third", "outer").returncode == 0
    assert refused(add_virtual(cluster, "inner", "third", "--replace"), 1,
                   "cycle", "inner -> third -> outer -> inner")
    assert json.loads(repo(cluster, "show", "inner", "--json").stdout)["members"][0]["name"] == "team-b"


async def test_refusals_are_one_clear_line(cluster):  # noqa: F811
    node = cluster.add("a")
    async with client_for(node) as client:
        await oci.push_image(client, "team/app", "v1", oci.build_image("local-content", layers=1))
    assert repo(cluster, "add", "hub", "--remote", upstream()).returncode == 0
    assert add_virtual(cluster, "dev", "team,hub").returncode == 0

    # The deployment target: one of the members, and one that takes pushes.
    assert refused(add_virtual(cluster, "v", "team,hub", "--deploy-to", "other"), 2, "other", "one of the members")
    assert refused(add_virtual(cluster, "v", "team,hub", "--deploy-to", "hub"), 1, "hub cannot take pushes")
    assert refused(add_virtual(cluster, "v", "team,dev", "--deploy-to", "dev"), 1, "dev cannot take pushes")
    # Names taken by local content or another definition.
    assert refused(add_virtual(cluster, "team", "hub"), 1, "local repositories", "team/app")
    assert refused(add_virtual(cluster, "team/app", "hub"), 1, "local repository")
    assert refused(add_virtual(cluster, "dev", "team"), 1, "virtual repository dev exists", "--replace")
    assert refused(add_virtual(cluster, "hub", "team"), 1, "remote repository hub exists")
    assert refused(add_virtual(cluster, "dev/inner", "team"), 1, "nest", "dev")
    assert refused(repo(cluster, "add", "dev/x", "--remote", upstream()), 1, "nest", "virtual repository dev")
    assert refused(add_virtual(cluster, "v", "hub/library"), 1, "inside remote repository hub")
    # Flags.
    assert refused(repo(cluster, "add", "v", "--virtual"), 2, "--members")
    assert refused(add_virtual(cluster, "v", "team", "--member-include", "hub=x"), 2, "hub is not one of the --members")
    assert refused(add_virtual(cluster, "v", "team", "--member-include", "team"), 2, "MEMBER=GLOB")
    assert refused(add_virtual(cluster, "v", "team", "--ttl", "1m"), 2, "--ttl", "only for --remote")
    assert refused(repo(cluster, "add", "v", "--remote", upstream(), "--members", "team"), 2, "only for --virtual")
    assert refused(add_virtual(cluster, "v", "team,team"), 2, "twice")
    assert [r["name"] for r in json.loads(repo(cluster, "list", "--json").stdout)] == ["dev", "hub"]
    # The deployment target of a virtual repository never becomes a cache.
    assert add_virtual(cluster, "dev", "team,hub,cache", "--replace", "--deploy-to", "cache").returncode == 0
    assert refused(repo(cluster, "add", "cache", "--remote", upstream()), 1, "deployment target", "dev")


async def test_nodes_follow_virtual_definitions_without_restart(cluster):  # noqa: F811
    cluster.add("a")
    async with EtcdClient([cluster.etcd_url]) as client:
        follower = ClusterMetadata(client, cluster.name, "follower")
        async with anyio.create_task_group() as tg:
            await tg.start(follower.run)
            assert add_virtual(cluster, "dev", "team-a,hub", "--deploy-to", "team-a").returncode == 0
            await eventually(lambda: "dev" in follower.virtual_definitions(), what="the watch to bring dev")
            assert follower.virtual_definitions()["dev"].deploy_to == "team-a"
            assert "dev" not in follower.repository_definitions() and "dev" not in follower.model.sorted_repos()
            assert add_virtual(cluster, "dev", "hub", "--member-include", "hub=library/*", "--replace").returncode == 0
            await eventually(lambda: follower.virtual_definitions()["dev"].members == (Member("hub", ("library/*",)),),
                             what="the change")
            assert repo(cluster, "remove", "dev").returncode == 0
            await eventually(lambda: "dev" not in follower.virtual_definitions(), what="the removal")
            tg.cancel_scope.cancel()
