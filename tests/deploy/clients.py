"""What the compose and Kubernetes tests do as a registry client, always against 127.0.0.1:
an htpasswd user, waiting for /readyz, a push and a pull with skopeo and credentials."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import bcrypt
import httpx

from tests.support.oci import build_image, write_oci_layout
from tests.support.poll import until
from tests.support.skopeo import SKOPEO

USER, PASSWORD = "deployer", "a-long-test-password"


def write_htpasswd(path: Path) -> Path:
    """One bcrypt user, readable by the image's user (uid 10001)."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
    path.write_text(f"{USER}:{hashed}\n")
    path.chmod(0o644)
    return path


def wait_ready(host_port: str, timeout: float = 180) -> None:
    def ready() -> bool:
        return httpx.get(f"http://{host_port}/readyz", timeout=5).status_code == 200

    until(ready, timeout=timeout, interval=1, what=f"{host_port}/readyz answers 200")


def _skopeo(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert done.returncode == 0, f"skopeo {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def push_test_image(host_port: str, repo: str, directory: Path) -> str:
    """Push a small generated image as repo:v1 with the test user's credentials; its manifest digest."""
    layout = write_oci_layout(directory / "pushed", {"v1": build_image(seed=repo)})
    _skopeo("copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
            f"oci:{layout}:v1", f"docker://{host_port}/{repo}:v1")
    return _skopeo("inspect", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", "--format", "{{.Digest}}",
                   f"docker://{host_port}/{repo}:v1").strip()


def pull(host_port: str, repo: str, directory: Path) -> str:
    """Pull repo:v1 (every blob) into an OCI layout; the pulled manifest's digest. A failed pull
    is an AssertionError, so `until` retries it."""
    target = directory / f"pulled-{host_port.replace(':', '-')}"
    shutil.rmtree(target, ignore_errors=True)
    _skopeo("copy", "--src-tls-verify=false", "--src-creds", f"{USER}:{PASSWORD}",
            f"docker://{host_port}/{repo}:v1", f"oci:{target}:v1")
    return _skopeo("inspect", "--format", "{{.Digest}}", f"oci:{target}:v1").strip()
