"""`cargohold user|robot|access ...` against a real etcd, checked through a running node."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.auth.conftest import cli, start_secured


@pytest.fixture(scope="module")
def empty(tmp_path_factory, etcd, cluster_name):
    """A node with access control on and nothing provisioned: the commands do all of it."""
    s = start_secured(tmp_path_factory, etcd, cluster_name, provision_accounts=False)
    try:
        yield s
    finally:
        s.node.stop()


def run(s, *args: str, input: str | None = None):
    return cli(*args, input=input, etcd=s.etcd_url, cluster=s.cluster)


def status_of(s, path: str = "/v2/", **kwargs) -> int:
    with httpx.Client(base_url=s.url) as c:
        return c.get(path, **kwargs).status_code


def wait_status(s, expected: int, path: str = "/v2/", **kwargs) -> None:
    """Wait until the node answers `expected`: it learns of account changes through its watch."""
    from tests.support.poll import until

    def answers() -> bool:
        status = status_of(s, path, **kwargs)
        assert status == expected, f"{path} answered {status}, not {expected}"
        return True
    until(answers, what=f"{path} to answer {expected}")


def test_users(empty):
    assert run(empty, "user", "add", "alice", "--group", "devs", "--password-stdin", "--bcrypt-cost", "4",
               input="alice-password\n").returncode == 0
    duplicate = run(empty, "user", "add", "alice", "--password-stdin", input="another-password\n")
    assert duplicate.returncode == 1 and "exists" in duplicate.stderr
    assert run(empty, "user", "add", "Bad/Name", "--password-stdin", input="long-enough\n").returncode == 2
    assert run(empty, "user", "add", "shorty", "--password-stdin", input="short\n").returncode == 2
    assert run(empty, "user", "add", "nopass").returncode == 2                # no terminal, no --password-stdin
    wait_status(empty, 200, auth=("alice", "alice-password"))

    listed = run(empty, "user", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["alice"] and rows[0]["groups"] == ["devs"] and not rows[0]["admin"]
    assert "$2" not in listed.stdout and "hash" not in listed.stdout
    assert "alice" in run(empty, "user", "list").stdout

    assert run(empty, "user", "passwd", "alice", "--password-stdin", "--bcrypt-cost", "4",
               input="new-alice-password\n").returncode == 0
    wait_status(empty, 401, auth=("alice", "alice-password"))
    wait_status(empty, 200, auth=("alice", "new-alice-password"))
    assert run(empty, "user", "passwd", "nobody", "--password-stdin", input="whatever-pw\n").returncode == 1

    assert run(empty, "user", "groups", "alice", "ops", "devs").returncode == 0
    assert json.loads(run(empty, "user", "list", "--json").stdout)[0]["groups"] == ["ops", "devs"]

    assert run(empty, "user", "remove", "alice").returncode == 0
    assert run(empty, "user", "remove", "alice").returncode == 1
    wait_status(empty, 401, auth=("alice", "new-alice-password"))


def test_robots(empty):
    added = run(empty, "robot", "add", "builder", "--description", "CI", "--json", "--bcrypt-cost", "4")
    assert added.returncode == 0, added.stderr
    document = json.loads(added.stdout)
    login, secret = document["name"], document["secret"]
    assert login == "robot$builder" and len(secret) >= 40
    wait_status(empty, 200, auth=(login, secret))
    assert status_of(empty, auth=("builder", secret)) == 401                 # a robot is not a user
    listed = run(empty, "robot", "list", "--json")
    assert secret not in listed.stdout and json.loads(listed.stdout)[0]["description"] == "CI"
    assert run(empty, "robot", "add", "builder").returncode == 1
    assert run(empty, "robot", "remove", "builder").returncode == 0
    wait_status(empty, 401, auth=(login, secret))


def test_access_rules(empty, tmp_path):
    shown = run(empty, "access", "rules", "list")
    assert shown.returncode == 0 and "default" in shown.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - subjects: [somebody]\n    repositories: ['**']\n    actions: [pull]\n")
    refused = run(empty, "access", "rules", "set", str(bad))
    assert refused.returncode == 2 and "somebody" in refused.stderr
    assert run(empty, "access", "rules", "set", str(tmp_path / "missing.yaml")).returncode == 2
    assert json.loads(run(empty, "access", "rules", "list", "--json").stdout)["default"] is True

    assert run(empty, "user", "add", "gina", "--password-stdin", "--bcrypt-cost", "4",
               input="gina-password\n").returncode == 0
    good = tmp_path / "rules.yaml"
    good.write_text("rules:\n"
                    "  - subjects: [anonymous]\n    repositories: ['public/**']\n    actions: [pull]\n"
                    "  - subjects: ['user:gina']\n    repositories: ['gina/*']\n    actions: [pull, push]\n"
                    "protected_tags:\n"
                    "  - repositories: ['gina/*']\n    tags: ['release-*']\n    subjects: ['user:nobody']\n")
    stored = run(empty, "access", "rules", "set", str(good))
    assert stored.returncode == 0 and "2 rules" in stored.stdout, stored.stderr
    document = json.loads(run(empty, "access", "rules", "list", "--json").stdout)
    assert len(document["rules"]) == 2 and document["updated_by"]
    wait_status(empty, 403, "/v2/other/x/tags/list", auth=("gina", "gina-password"))
    wait_status(empty, 404, "/v2/gina/x/tags/list", auth=("gina", "gina-password"))


def test_commands_need_etcd(empty, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOHOLD_")}
    result = subprocess.run([sys.executable, "-m", "cargohold", "user", "list"], capture_output=True, text=True,
                            env=env, timeout=60, cwd=tmp_path)          # no --etcd, no private etcd in ./data
    assert result.returncode == 2 and "--etcd" in result.stderr
