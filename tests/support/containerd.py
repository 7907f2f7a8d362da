"""A private containerd daemon for tests: its own root, state and sockets under a temp dir, so a
test never touches (or needs) the machine's containerd. `ctr` runs against its socket in the
namespace `cargohold-test`.

    with private_containerd(tmp_path / "containerd") as ctr:
        ctr("images", "pull", "--plain-http", "127.0.0.1:5000/small/app:v1")

Needs root (containerd mounts its snapshots) and the Debian package `containerd` (which has `ctr`);
`missing()` says what is absent, for a skip reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

from tests.support.poll import until

NAMESPACE = "cargohold-test"

CONTAINERD_CONFIG = """\
version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  address = "{root}/debug.sock"
"""


class Ctr(Protocol):
    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> str: ...


class CtrError(AssertionError):
    """`ctr` exited non-zero; the message has its stderr and the daemon's log tail."""


def missing() -> str | None:
    """Why a private containerd cannot run here (for `pytest.skip`), or None."""
    absent = [tool for tool in ("containerd", "ctr") if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} not installed (Debian package containerd; ./install.sh --test installs it)"
    if os.geteuid() != 0:
        return "a private containerd needs root (it mounts its snapshots)"
    return None


@contextmanager
def containerd_or_skip(root: Path) -> Iterator[Ctr]:
    """`private_containerd(root)` for a fixture; the test is skipped, saying why, where it cannot run."""
    import pytest

    reason = missing()
    if reason:
        pytest.skip(reason)
    with private_containerd(root) as run:
        yield run


@contextmanager
def private_containerd(root: Path) -> Iterator[Ctr]:
    """Start containerd with everything under `root` (created); yield a `ctr` runner; stop it and
    unmount whatever it left mounted under `root`."""
    root.mkdir(parents=True)
    (root / "config.toml").write_text(CONTAINERD_CONFIG.format(root=root))
    log = open(root / "containerd.log", "wb")
    daemon = subprocess.Popen(["containerd", "--config", str(root / "config.toml")], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    socket = root / "containerd.sock"

    def ctr(*args: str, check: bool = True, timeout: float = 300) -> str:
        result = subprocess.run(["ctr", "--address", str(socket), "--namespace", NAMESPACE, *args],
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise CtrError(f"ctr {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}\n"
                           f"containerd log tail:\n{log_tail(root)}")
        return result.stdout if check else result.stdout + result.stderr

    try:
        until(lambda: socket.exists() and ctr("version"), timeout=30, what="containerd starts")
        yield ctr
    finally:
        _stop(daemon)
        log.close()
        _unmount_under(root)


def _stop(daemon: subprocess.Popen) -> None:
    daemon.terminate()
    try:
        daemon.wait(timeout=15)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def _unmount_under(root: Path) -> None:
    for line in Path("/proc/mounts").read_text().splitlines():
        mountpoint = line.split()[1]
        if mountpoint.startswith(str(root)):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def log_tail(root: Path) -> str:
    path = root / "containerd.log"
    return path.read_text(errors="replace")[-1500:] if path.exists() else ""


def image_digest(ctr: Ctr, ref: str) -> str:
    """The manifest digest `ctr images list` shows for `ref`."""
    row = ctr("images", "list", f"name=={ref}").splitlines()[1].split()
    return next(field for field in row if field.startswith("sha256:"))
