"""Fixtures for access-control tests: accounts provisioned straight into etcd, nodes with
access control on, and an httpx auth that does what docker/skopeo do with a Bearer challenge."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from cargohold.coordinator.accounts import Account, AccountStore
from cargohold.coordinator.etcd import EtcdClient
from cargohold.auth.passwords import hash_password
from tests.support.node import REPO_ROOT, NodeProcess

RULES = {
    "rules": [
        {"subjects": ["anonymous"], "repositories": ["public/**"], "actions": ["pull"]},
        {"subjects": ["group:devs", "robot:ci"], "repositories": ["team/**", "public/**"],
         "actions": ["pull", "push", "delete"]},
        {"subjects": ["user:reader"], "repositories": ["team/**"], "actions": ["pull"]},
        {"subjects": ["user:bob"], "repositories": ["bob/*"], "actions": ["pull", "push"]},
    ],
    "protected_tags": [{"repositories": ["team/**"], "tags": ["v*", "stable"], "subjects": ["robot:ci"]}],
}
PASSWORDS = {"admin": "admin-password", "alice": "alice-password", "reader": "reader-password",
             "bob": "bob-password"}
GROUPS = {"alice": ("devs",)}


@dataclass
class Secured:
    node: NodeProcess
    etcd_url: str
    cluster: str
    audit_log: Path
    robots: dict[str, str] = field(default_factory=dict)    # login -> secret

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def service(self) -> str:
        return f"cargohold-{self.cluster}"

    def client(self, login: str | None = None, *, basic: bool = False) -> httpx.AsyncClient:
        """A client that logs in as `login` through the token flow (or sends Basic on every request)."""
        secret = self.robots.get(login) or PASSWORDS.get(login) if login else None
        auth = (login, secret) if basic else TokenAuth(login, secret)
        return httpx.AsyncClient(base_url=self.url, auth=auth, timeout=30.0)


def provision(etcd_url: str, cluster: str, *, users=PASSWORDS, robots=("ci",), rules=RULES) -> dict[str, str]:
    """Write accounts and rules into etcd (cheap bcrypt cost); returns the robots' logins and secrets."""
    secrets_by_login = {}

    async def go():
        async with EtcdClient([etcd_url]) as client:
            store = AccountStore(client, cluster)
            for name, password in users.items():
                await store.put_account(Account("user", name, hash_password(password, 4), GROUPS.get(name, ()),
                                                admin=name == "admin", updated_by="tests"), create=True)
            for name in robots:
                secret = f"{name}-robot-secret-0123456789"
                await store.put_account(Account("robot", name, hash_password(secret, 4), updated_by="tests"),
                                        create=True)
                secrets_by_login[f"robot${name}"] = secret
            if rules is not None:
                await store.set_rules(rules, "tests")

    anyio.run(go, backend="trio")
    return secrets_by_login


def start_secured(tmp_path_factory, etcd, cluster: str, *extra: str, runtime: str = "asyncio",
                  node_id: str = "n1", provision_accounts: bool = True) -> Secured:
    robots = provision(etcd.url, cluster) if provision_accounts else {}
    data = tmp_path_factory.mktemp(f"auth-{node_id}")
    audit_log = data / "audit.log"
    node = NodeProcess(data, etcd_url=etcd.url, cluster=cluster, node_id=node_id, runtime=runtime,
                       extra_args=["--auth", "on", "--audit-log", str(audit_log), *extra])
    node.start()
    return Secured(node, etcd.url, cluster, audit_log, robots)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, etcd, cluster_name):
    """One node with access control on, accounts and RULES provisioned, an audit log."""
    s = start_secured(tmp_path_factory, etcd, cluster_name)
    try:
        yield s
    finally:
        s.node.stop()


def parse_challenge(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer", header
    return dict(re.findall(r'(\w+)="([^"]*)"', rest))


class TokenAuth(httpx.Auth):
    """The Docker token flow, as clients do it: on a 401 Bearer challenge, get a token for the
    challenge's scope from its realm (with Basic credentials if we have them), and retry."""

    requires_request_body = True
    requires_response_body = True

    def __init__(self, username: str | None, password: str | None):
        self.credentials = httpx.BasicAuth(username, password) if username else None
        self.last_token: str | None = None

    def auth_flow(self, request):
        response = yield request
        if response.status_code != 401 or "bearer" not in response.headers.get("www-authenticate", "").lower():
            return
        challenge = parse_challenge(response.headers["www-authenticate"])
        params = {"service": challenge["service"]}
        if "scope" in challenge:
            params["scope"] = challenge["scope"]
        token_request = httpx.Request("GET", challenge["realm"], params=params)
        if self.credentials is not None:
            token_request = next(self.credentials.auth_flow(token_request))
        token_response = yield token_request
        if token_response.status_code != 200:
            return
        self.last_token = token_response.json()["token"]
        request.headers["Authorization"] = f"Bearer {self.last_token}"
        yield request


def cli(*args: str, input: str | None = None, etcd: str | None = None, cluster: str | None = None):
    """Run `python -m cargohold ARGS` with --etcd/--cluster from the environment."""
    import os

    env = dict(os.environ)
    if etcd:
        env["CARGOHOLD_ETCD"] = etcd
    if cluster:
        env["CARGOHOLD_CLUSTER"] = cluster
    return subprocess.run([sys.executable, "-m", "cargohold", *args], input=input, capture_output=True, text=True,
                          env=env, cwd=str(REPO_ROOT), timeout=60)
