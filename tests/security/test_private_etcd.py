"""Issue 12, item 3: the private etcd of a single node (accounts' bcrypt hashes, the token
signing key) is reachable by the node's own user only, and the node's CLI still finds it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cargohold.coordinator.embedded import private_etcd_url
from tests.support.node import REPO_ROOT, NodeProcess

OTHER_USER = "cargohold-probe"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"),
                                reason="needs root to create and become another local user")


@pytest.fixture(scope="module")
def other_user() -> str:
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER], check=True)
    return OTHER_USER


@pytest.fixture(scope="module")
def single_node():
    # A data dir any user may traverse: only the node's own protection may stop the probe.
    data_dir = Path(tempfile.mkdtemp(prefix="ch-private-", dir="/tmp"))
    data_dir.chmod(0o755)
    node = NodeProcess(data_dir, etcd_url=None, cluster="default", node_id="solo")
    node.start()
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _curl_as(user: str, url: str, path: str = "/v3/kv/range") -> subprocess.CompletedProcess:
    """POST etcd's JSON gateway as `user`: every key of the store (key "\\0", range_end "\\0")."""
    if url.startswith("unix://"):
        target = ["--unix-socket", url.removeprefix("unix://"), f"http://localhost{path}"]
    else:
        target = [url + path]
    command = ["runuser", "-u", user, "--", "curl", "-s", "-m", "5", "-X", "POST", "-d",
               '{"key":"AA==","range_end":"AA=="}', *target]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def _tcp_listeners_of(pid: int) -> list[str]:
    """The TCP sockets process `pid` listens on (from /proc: state 0A is LISTEN)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1])
    return found


def _etcd_pid(node: NodeProcess) -> int:
    # etcd is forked from a spawner thread: look at the children of every thread
    children = [c for task in Path(f"/proc/{node.pid}/task").iterdir() for c in (task / "children").read_text().split()]
    for child in children:
        if Path(f"/proc/{child}/comm").read_text().strip() == "etcd":
            return int(child)
    raise AssertionError(f"no etcd child of the node {node.pid}")


def test_another_local_user_cannot_read_the_private_etcd(single_node, other_user):
    url = private_etcd_url(single_node.data_dir)
    assert url is not None
    as_root = _curl_as("root", url)
    assert '"kvs"' in as_root.stdout            # the probe works: the node's user reads everything
    probe = _curl_as(other_user, url)
    assert '"kvs"' not in probe.stdout and probe.returncode != 0, probe


def test_the_private_etcd_listens_on_no_tcp_port(single_node):
    assert _tcp_listeners_of(_etcd_pid(single_node)) == []


def test_the_nodes_cli_still_finds_its_private_etcd(single_node):
    env = {k: v for k, v in os.environ.items() if k not in ("CARGOHOLD_ETCD", "CARGOHOLD_CLUSTER")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    run = subprocess.run([sys.executable, "-m", "cargohold", "user", "list", "--json",
                          "--data-dir", str(single_node.data_dir)], capture_output=True, text=True,
                         env=env, cwd=str(REPO_ROOT), timeout=60)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "cargohold", "node", "list", "--json"], capture_output=True,
                         text=True, env=env, cwd=str(single_node.data_dir.parent), timeout=60)
    assert run.returncode == 2 or "solo" not in run.stdout   # another dir's ./data is not this node
    run = subprocess.run([sys.executable, "-m", "cargohold", "node", "list", "--json",
                          "--data-dir", str(single_node.data_dir)], capture_output=True, text=True,
                         env=env, cwd=str(REPO_ROOT), timeout=60)
    assert run.returncode == 0 and "solo" in run.stdout, run.stderr
