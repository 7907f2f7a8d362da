"""deploy/compose.yaml under podman-compose: three etcd members and four nodes in two sites come
up, an image pushed at site eu is pulled at site us, and everything is brought down again.
Only the two published ports are used, both on 127.0.0.1."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.deploy.clients import pull, push_test_image, wait_ready, write_htpasswd
from tests.deploy.conftest import Podman, require
from tests.support.node import free_port
from tests.support.poll import until

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"
SERVICES = ["etcd1", "etcd2", "etcd3", "eu1", "eu2", "us1", "us2"]


@pytest.fixture
def compose_cluster(podman, cargohold_image, tmp_path):
    """The compose file up under a project name of its own; down (with its volumes) afterwards."""
    require("podman-compose", "skopeo")
    project = f"cargohold-test-{uuid.uuid4().hex[:6]}"
    eu, us = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    compose = Podman(podman.root, {**podman.env, "CARGOHOLD_IMAGE": cargohold_image.tag, "CARGOHOLD_EU_PORT": eu,
                                   "CARGOHOLD_US_PORT": us,
                                   "CARGOHOLD_HTPASSWD": str(write_htpasswd(tmp_path / "htpasswd"))})
    project_args = ["-p", project, "-f", str(COMPOSE_FILE)]
    try:
        compose.run(*project_args, "up", "-d", tool="podman-compose", timeout=300)
        yield eu, us
    except BaseException:
        _print_logs(podman, project)
        raise
    finally:
        compose.run(*project_args, "down", "-v", tool="podman-compose", timeout=300)
        podman.run("network", "rm", "-f", f"{project}_default", check=False)   # `down` leaves it


def _print_logs(podman: Podman, project: str) -> None:
    """What each container said last (pytest shows it with the failure)."""
    for service in SERVICES:
        logs = podman.run("logs", "--tail", "30", f"{project}_{service}_1", check=False)
        print(f"--- {service}\n{logs.stdout}{logs.stderr}")


def test_push_at_one_site_pull_at_the_other(compose_cluster, tmp_path):
    eu, us = compose_cluster
    wait_ready(eu)
    wait_ready(us)
    pushed = push_test_image(eu, "team/app", tmp_path)
    assert pull(eu, "team/app", tmp_path) == pushed
    # site us gets the image by replication: it serves it once its copies have arrived
    assert until(lambda: pull(us, "team/app", tmp_path), timeout=120, interval=1,
                 what="site us serves the image pushed at site eu") == pushed
