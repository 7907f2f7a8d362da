"""CARGOHOLD_ADMIN_PASSWORD: the first administrator, created when a node starts on a public
address and the cluster has no account (README "Deploy"): stored once, never logged, ignored
once any account exists."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from cargohold import config
from cargohold.config import ConfigError
from tests.auth.conftest import cli
from tests.auth.test_secure_default import _node, _public, _refused

PASSWORD = "first-admin-password"


def _start_public(node, monkeypatch, **env: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    node.extra_args = ["--listen", _public(node)]
    return node


def test_admin_password_creates_the_first_admin_once(tmp_path_factory, etcd, monkeypatch):
    node = _node(tmp_path_factory, etcd, f"t-boot-{uuid.uuid4().hex[:8]}")
    _start_public(node, monkeypatch, CARGOHOLD_ADMIN_PASSWORD=PASSWORD).start()
    try:
        with httpx.Client(base_url=node.url) as c:
            assert c.get("/v2/").status_code == 401                         # protected from the start
            assert c.get("/v2/", auth=("admin", PASSWORD)).status_code == 200
            assert c.post("/v2/a/blobs/uploads/", auth=("admin", PASSWORD)).status_code == 202
    finally:
        node.stop()
    users = json.loads(cli("user", "list", "--json", etcd=etcd.url, cluster=node.cluster).stdout)
    assert [(u["name"], u["admin"]) for u in users] == [("admin", True)], users
    assert PASSWORD not in node.log_path.read_text()
    assert "created the administrator 'admin'" in node.log_path.read_text()
    _start_public(node, monkeypatch, CARGOHOLD_ADMIN_PASSWORD="another-password").start()   # ignored now
    try:
        with httpx.Client(base_url=node.url) as c:
            assert c.get("/v2/", auth=("admin", "another-password")).status_code == 401
            assert c.get("/v2/", auth=("admin", PASSWORD)).status_code == 200
    finally:
        node.stop()


def test_admin_password_file_and_name(tmp_path_factory, etcd, monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    node = _node(tmp_path_factory, etcd, f"t-bootf-{uuid.uuid4().hex[:8]}")
    _start_public(node, monkeypatch, CARGOHOLD_ADMIN_PASSWORD_FILE=str(secret), CARGOHOLD_ADMIN_USER="root").start()
    try:
        with httpx.Client(base_url=node.url) as c:
            assert c.get("/v2/", auth=("root", PASSWORD)).status_code == 200
    finally:
        node.stop()


@pytest.mark.parametrize("env, text", [
    ({"CARGOHOLD_ADMIN_PASSWORD": "short"}, "at least 8 characters"),
    ({"CARGOHOLD_ADMIN_PASSWORD_FILE": "/nonexistent/secret"}, "admin_password_file"),
    ({}, "CARGOHOLD_ADMIN_PASSWORD"),                                   # the refusal says how
])
def test_bad_or_missing_admin_password_refuses_to_start(tmp_path_factory, etcd, monkeypatch, env, text):
    node = _node(tmp_path_factory, etcd, f"t-bootx-{uuid.uuid4().hex[:8]}")
    _refused(_start_public(node, monkeypatch, **env), text)


def test_admin_password_settings_are_checked_and_never_shown():
    both = {"CARGOHOLD_ADMIN_PASSWORD": PASSWORD, "CARGOHOLD_ADMIN_PASSWORD_FILE": "/run/secrets/admin"}
    with pytest.raises(ConfigError, match="not both"):
        config.load(None, {}, both)
    settings = config.load(None, {}, {"CARGOHOLD_ADMIN_PASSWORD": PASSWORD})
    assert settings.admin_password == PASSWORD and PASSWORD not in repr(settings)
