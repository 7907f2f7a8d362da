"""A private single-member etcd for ``cargohold serve`` without ``--etcd`` (and for tests).

The etcd child must not outlive its parent, even one killed with SIGKILL. On Linux the
child asks for ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (in a ``preexec_fn``). That signal is
tied to the *thread* that forked the child, not to the process: a child forked from an
anyio/trio worker thread would be terminated as soon as that idle thread is retired
(trio's ``open_process`` forks from such a thread). So every etcd is forked from one
dedicated spawner thread that lives as long as the process, and nothing else is needed:
no watchdog process, no polling of the parent.

The child also gets a session of its own (``start_new_session``), so a Ctrl-C on the
terminal reaches cargohold only, which then stops etcd after it has shut down cleanly.

The private etcd holds the accounts' bcrypt hashes and the token signing key, and has no
authentication of its own: whoever reaches it is the registry's administrator. So it listens
on no TCP port at all: its client and peer endpoints are Unix sockets inside ``data_dir/etcd``,
a directory of mode 0700, and only the node's user can connect (connecting to a socket needs
search permission on its directory). etcd 3.4 accepts ``unix://HOST:PORT`` only and makes the
socket file ``HOST:PORT`` in its working directory, so etcd runs with that directory as cwd.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing, suppress
from pathlib import Path

import anyio

__all__ = ["embedded_etcd"]

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1
_BOOTSTRAPPED = "bootstrapped"  # marker file: etcd's data dir was healthy once
# Socket file names in the state dir; etcd wants the form HOST:PORT (the port is only a name).
CLIENT_SOCKET = "client:2379"
PEER_SOCKET = "peer:2380"

_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawner_thread() -> ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cargohold-etcd-spawner")
        return _spawner


def _die_with_parent() -> object:
    """A preexec_fn that sets PR_SET_PDEATHSIG, or None where there is no prctl."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _popen(command: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )


def spawn_etcd(command: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start etcd (output appended to ``log_path``) from the process-lifetime spawner thread."""
    try:
        return _spawner_thread().submit(_popen, command, log_path, cwd).result()
    except FileNotFoundError as exc:
        raise RuntimeError(f"cannot start etcd: {command[0]!r} not found (is etcd installed and on PATH?)") from exc


def etcd_command(binary: str, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    """etcd on loopback TCP ports (a shared etcd for tests and development)."""
    return _etcd_args(binary, data_dir, f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}")


def private_etcd_command(binary: str, data_dir: Path) -> list[str]:
    """etcd on Unix sockets only, created in its working directory (see the module docstring)."""
    return _etcd_args(binary, data_dir, f"unix://{CLIENT_SOCKET}", f"unix://{PEER_SOCKET}")


def _etcd_args(binary: str, data_dir: Path, client: str, peer: str) -> list[str]:
    return [
        binary,
        "--name", "cargohold",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"cargohold={peer}",
        "--logger", "zap",
        "--log-outputs", "stderr",
        # Keep an hour of history (enough for any watch to resume) and no more, so the
        # database does not grow without bound.
        "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", "1h",
        # A manifest PUT is one transaction with an operation per layer and reference; etcd's
        # default of 128 operations per branch would refuse images with ~120+ layers.
        "--max-txn-ops", "4096",
    ]  # fmt: skip


def _port_is_free(port: int) -> bool:
    with closing(socket.socket()) as sock:
        # As etcd (Go) does: connections left in TIME_WAIT by a stopped etcd don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def choose_ports(previous: list[int] | None, count: int = 2) -> list[int]:
    """``previous`` when all of them are free, else ``count`` fresh free loopback ports."""
    if previous and len(previous) == count and all(_port_is_free(p) for p in previous):
        return list(previous)
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so the ports are distinct
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no etcd log)"
    return "\n".join(text.splitlines()[-lines:])


def etcd_healthy(url: str, timeout: float = 1.0) -> bool:
    """Whether etcd's ``/health`` says healthy (it has a leader and can serve reads).
    ``url`` is ``http://HOST:PORT`` or ``unix:///path/to/socket``."""
    if url.startswith("unix://"):
        return _unix_healthy(url.removeprefix("unix://"), timeout)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"{url}/health", timeout=timeout) as resp:
            return json.load(resp).get("health") == "true"
    except (OSError, ValueError):
        return False


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _unix_healthy(path: str, timeout: float) -> bool:
    connection = _UnixHTTPConnection(path, timeout)
    try:
        connection.request("GET", "/health")
        return json.load(connection.getresponse()).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def wait_until_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = READY_TIMEOUT) -> None:
    """Block until etcd at ``url`` is healthy; RuntimeError (with the log tail) if it dies or times out."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"etcd exited with code {code} while starting; end of {log_path}:\n{log_tail(log_path)}")
        if etcd_healthy(url):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"etcd at {url} not healthy after {timeout:.0f} s; end of {log_path}:\n{log_tail(log_path)}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                proc.kill()
    proc.wait()


def _prepare(state_dir: Path) -> Path:
    """Create the state dir (mode 0700: only this user may reach the sockets in it), drop an
    unfinished bootstrap and stale sockets; returns the client socket's path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)        # also for a state dir made by an older version
    # etcd's first start is not atomic: one stopped while it bootstraps a new member leaves
    # a data dir with an empty member list that never elects a leader again. A data dir that
    # never got healthy holds no data of ours, so it is started afresh.
    if not (state_dir / _BOOTSTRAPPED).exists():
        shutil.rmtree(state_dir / "data", ignore_errors=True)
    (state_dir / "ports.json").unlink(missing_ok=True)   # older versions listened on TCP ports
    for name in (CLIENT_SOCKET, PEER_SOCKET):            # left by an etcd that was killed
        (state_dir / name).unlink(missing_ok=True)
    client_socket = state_dir.resolve() / CLIENT_SOCKET
    if len(str(client_socket).encode()) >= _MAX_SOCKET_PATH:
        raise RuntimeError(f"the private etcd's socket path {client_socket} is too long for a Unix socket "
                           f"(at most {_MAX_SOCKET_PATH - 1} bytes): use a shorter --data-dir, or --etcd")
    return client_socket


_MAX_SOCKET_PATH = 108    # sun_path on Linux, with its terminating NUL


@asynccontextmanager
async def embedded_etcd(data_dir: Path, *, etcd_binary: str = "etcd") -> AsyncIterator[str]:
    """Start a private single-member etcd under data_dir/etcd on Unix sockets; yield its client URL
    ("unix:///.../etcd/client:2379"); on exit stop it (SIGTERM, wait up to 10 s, then SIGKILL)."""
    state_dir = Path(data_dir) / "etcd"
    log_path = state_dir / "etcd.log"
    client_socket = await anyio.to_thread.run_sync(_prepare, state_dir)
    url = f"unix://{client_socket}"
    command = private_etcd_command(etcd_binary, state_dir.resolve() / "data")
    proc = await anyio.to_thread.run_sync(spawn_etcd, command, log_path, state_dir)
    try:
        # Abandoned on cancellation: the thread ends as soon as the process is stopped below.
        await anyio.to_thread.run_sync(wait_until_healthy, proc, url, log_path, abandon_on_cancel=True)
        await anyio.to_thread.run_sync((state_dir / _BOOTSTRAPPED).touch)
        yield url
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stop_process, proc)


def private_etcd_url(data_dir: Path) -> str | None:
    """The client URL of the private etcd a node started under `data_dir`, if there is one."""
    client_socket = Path(data_dir).resolve() / "etcd" / CLIENT_SOCKET
    return f"unix://{client_socket}" if client_socket.is_socket() else None
