"""The container image (issue 16): built offline with deploy/container/build.sh, run with podman,
used with skopeo, and able to host itself: the image is pushed into the cargohold it runs and
containerd's `ctr` pulls it back with the same digest.

Loopback only: the container publishes 127.0.0.1:PORT; containerd is a private daemon with its
own root, state and socket under the test's temp dir. Everything started is stopped.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.deploy.conftest import Podman, require
from tests.support.containerd import private_containerd
from tests.support.node import free_port
from tests.support.oci import build_image, write_oci_layout
from tests.support.poll import until

ADMIN_PASSWORD = "image-test-admin-password"
CREDS = f"admin:{ADMIN_PASSWORD}"
SIZE_LIMIT = 200 * 1000 * 1000       # the target, uncompressed


def _inspect(podman: Podman, tag: str) -> dict:
    return json.loads(podman.run("image", "inspect", tag).stdout)[0]


@contextmanager
def _container(podman: Podman, image: str, data: Path, *env: str):
    """`podman run -d` the image with `data` as /data and port 5000 on 127.0.0.1; yields the URL."""
    port = free_port()
    args = ["run", "-d", "-p", f"127.0.0.1:{port}:5000", "-v", f"{data}:/data"]
    for assignment in env:
        args += ["-e", assignment]
    container = podman.run(*args, image).stdout.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, timeout=90,
                  what="the container answers /readyz")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{podman.run('logs', container, check=False).stderr[-3000:]}") from None
        yield url, container
    finally:
        podman.run("stop", "--time", "10", container, check=False)
        podman.run("rm", "--force", container, check=False)


def _volume(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    shutil.chown(data, 10001, 10001)          # the image's user, as a named volume would be
    return data


def _skopeo(podman: Podman, *args: str, timeout: float = 300) -> str:
    return podman.run("--insecure-policy", *args, tool="skopeo", timeout=timeout).stdout


def test_image_is_small_labelled_and_unprivileged(podman, cargohold_image):
    image = _inspect(podman, cargohold_image.tag)
    config = image["Config"]
    assert image["Size"] < SIZE_LIMIT, f"{image['Size'] / 1e6:.0f} MB"
    assert config["User"] == "10001:10001"
    assert "/data" in config["Volumes"] and "5000/tcp" in config["ExposedPorts"]
    assert "CARGOHOLD_LISTEN=0.0.0.0:5000" in config["Env"] and "CARGOHOLD_DATA_DIR=/data" in config["Env"]
    assert image["Healthcheck"]["Test"][0] == "CMD" and "healthcheck.py" in image["Healthcheck"]["Test"][-1]
    labels = config["Labels"]
    for name in ("source", "version", "licenses"):
        assert labels[f"org.opencontainers.image.{name}"], name
    assert len(image["RootFS"]["Layers"]) == 1                              # from scratch, one layer
    version = podman.run("run", "--rm", cargohold_image.tag, "--version").stdout
    assert version.startswith("cargohold ")


def test_without_an_admin_the_container_refuses_to_start(podman, cargohold_image, tmp_path):
    result = podman.run("run", "--rm", "-v", f"{_volume(tmp_path)}:/data", cargohold_image.tag, check=False)
    assert result.returncode != 0
    assert "CARGOHOLD_ADMIN_PASSWORD" in result.stderr + result.stdout


def test_push_pull_and_host_its_own_image(podman, cargohold_image, tmp_path):
    require("containerd", "ctr")
    data = _volume(tmp_path)
    layout = write_oci_layout(tmp_path / "layout", {"v1": build_image("image-test")})
    with _container(podman, cargohold_image.tag, data, f"CARGOHOLD_ADMIN_PASSWORD={ADMIN_PASSWORD}") as (url, name):
        host = url.removeprefix("http://")
        assert httpx.get(f"{url}/v2/", timeout=5).status_code == 401          # not an open registry
        creds = ("--dest-tls-verify=false", "--dest-creds", CREDS)
        _skopeo(podman, "copy", *creds, f"oci:{layout}:v1", f"docker://{host}/small/app:v1")
        _skopeo(podman, "copy", "--src-tls-verify=false", "--src-creds", CREDS,
                f"docker://{host}/small/app:v1", f"oci:{tmp_path / 'back'}:v1")
        assert _manifest_digest(tmp_path / "back") == _manifest_digest(layout)
        until(lambda: podman.run("healthcheck", "run", name, check=False).returncode == 0, timeout=30,
              what="the image's HEALTHCHECK passes")
        users = json.loads(podman.run("exec", name, "cargohold", "user", "list", "--json").stdout)
        assert [(u["name"], u["admin"]) for u in users] == [("admin", True)]     # the CLI finds /data's etcd
        # the image itself, into the registry it runs
        _skopeo(podman, "copy", *creds, f"containers-storage:{cargohold_image.tag}",
                f"docker://{host}/cargohold/cargohold:self", timeout=600)
        pushed = _skopeo(podman, "inspect", "--tls-verify=false", "--creds", CREDS, "--format", "{{.Digest}}",
                         f"docker://{host}/cargohold/cargohold:self").strip()
        with private_containerd(tmp_path / "containerd") as ctr:
            ref = f"{host}/cargohold/cargohold:self"
            ctr("images", "pull", "--plain-http", "--user", CREDS, ref)
            listed = ctr("images", "list", f"name=={ref}").splitlines()[1].split()
            assert pushed in listed, (pushed, listed)
    # a new container on the same volume keeps everything, and the first password
    with _container(podman, cargohold_image.tag, data, "CARGOHOLD_ADMIN_PASSWORD=a-different-password") as (url, _):
        tags = httpx.get(f"{url}/v2/cargohold/cargohold/tags/list", auth=("admin", ADMIN_PASSWORD), timeout=10)
        assert tags.status_code == 200 and tags.json()["tags"] == ["self"]
        assert httpx.get(f"{url}/v2/", auth=("admin", "a-different-password"), timeout=10).status_code == 401


def _manifest_digest(layout: Path) -> str:
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
