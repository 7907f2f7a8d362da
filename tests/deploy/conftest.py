"""Shared fixtures for the deployment tests: podman set up for this kind of machine, in a
private storage, and the cargohold image built once per session with deploy/container/build.sh.

    from tests.deploy.conftest import Podman, cargohold_image, podman   # fixtures, for other modules

Everything lives in one session temp dir (image storage, podman's run state, container
volumes); at the end every container is removed and the storage unmounted and deleted.
Loopback only: containers publish their ports on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "deploy" / "container" / "build.sh"
IMAGE_TAG = "localhost/cargohold:test"
BUILD_TIMEOUT = 900          # about 1.5 min here (mmdebstrap + PyPI + buildah); generous for a busy CI

# podman on this kind of machine (a container without systemd or cgroup delegation): the runc
# runtime, cgroupfs, and no default ulimits (raising them is not allowed here).
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (./install.sh --test installs them)")
    if os.geteuid() != 0:
        pytest.skip("container tests need root (mmdebstrap, buildah and podman here run rootful)")


@dataclass
class Podman:
    """podman, buildah and skopeo pointed at the session's private storage and configuration."""
    root: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None,
            tool: str = "podman") -> subprocess.CompletedProcess:
        command = [tool, "--runtime", "runc", *args] if tool == "podman" else [tool, *args]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout,
                                input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def cleanup(self) -> None:
        self.run("rm", "--all", "--force", "--time", "0", check=False)
        self.run("rmi", "--all", "--force", check=False)
        # overlay mounts left under the storage would make the directory impossible to delete
        for line in Path("/proc/mounts").read_text().splitlines():
            mountpoint = line.split()[1]
            if mountpoint.startswith(str(self.root)):
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    """A podman whose images, containers and run state live in a session temp dir."""
    require("podman", "runc", "buildah", "skopeo")
    root = tmp_path_factory.mktemp("podman")
    (root / "containers.conf").write_text(CONTAINERS_CONF)
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n')
    env = dict(os.environ, CONTAINERS_CONF=str(root / "containers.conf"),
               CONTAINERS_STORAGE_CONF=str(root / "storage.conf"), TMPDIR=str(root))
    tool = Podman(root, env)
    yield tool
    tool.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class BuiltImage:
    tag: str
    seconds: float            # how long the offline build took
    log: str


@pytest.fixture(scope="session")
def cargohold_image(podman) -> BuiltImage:
    """The cargohold image, built offline once per session into the private storage."""
    require("mmdebstrap")
    env = dict(podman.env, PYTHON=sys.executable)
    started = time.monotonic()
    result = subprocess.run(["sh", str(BUILD_SCRIPT), "--tag", IMAGE_TAG], env=env, capture_output=True,
                            text=True, timeout=BUILD_TIMEOUT)
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    print(f"\ncargohold image built offline in {seconds:.0f} s")
    return BuiltImage(IMAGE_TAG, seconds, result.stdout)
