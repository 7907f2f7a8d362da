"""Run a cargohold node as a real process, for fixtures (synchronous API).

``NodeProcess`` starts ``python -m cargohold serve`` on a free loopback port, waits
for ``GET /readyz`` to answer 200 and can stop, kill -9 and restart it on the same
port and data directory.  The node's stdout and stderr go to ``<data_dir>/node.log``
(appended across restarts), so a failure can show what the node said.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from tests.support.poll import until

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeStartError(RuntimeError):
    pass


class NodeProcess:
    ready_path = "/readyz"   # answers 200 once the process serves requests

    def __init__(
        self,
        data_dir: Path | str,
        *,
        etcd_url: str | None = None,
        cluster: str = "default",
        node_id: str = "n1",
        runtime: str = "asyncio",
        extra_args: Sequence[str] = (),
        source_dir: Path | str = REPO_ROOT,
        python: str = sys.executable,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.etcd_url = etcd_url
        self.cluster = cluster
        self.node_id = node_id
        self.runtime = runtime
        self.extra_args = list(extra_args)
        self.source_dir = Path(source_dir)   # the tree whose `cargohold` package runs
        self.python = python
        self.port: int | None = None
        self.grpc_port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # -- properties ---------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("node not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``, the registry host as skopeo/docker write it."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", "cargohold", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--grpc-listen", f"127.0.0.1:{self.grpc_port}",
            "--data-dir", str(self.data_dir),
            "--cluster", self.cluster,
            "--node-id", self.node_id,
            "--runtime", self.runtime,
        ]
        if self.etcd_url:
            cmd += ["--etcd", self.etcd_url]
        return cmd + self.extra_args

    def start(self, timeout: float = READY_TIMEOUT) -> "NodeProcess":
        if self.alive():
            raise RuntimeError("node already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        if self.grpc_port is None:
            self.grpc_port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.source_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n=== start: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(self.source_dir),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def ready_client(self) -> httpx.Client:
        """The client that asks /readyz (a TLS node overrides it to trust its CA)."""
        return httpx.Client(timeout=2.0)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise NodeStartError(f"node exited with code {self.proc.returncode} before it was ready;"
                                     f" log tail:\n{self.log_tail()}")
            return client.get(self.url + self.ready_path).status_code == 200

        with self.ready_client() as client:
            try:
                until(ready, timeout=timeout, what=f"{self.url}{self.ready_path} to answer 200")
            except AssertionError as exc:
                raise NodeStartError(f"{exc}; log tail:\n{self.log_tail()}") from None

    def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``). Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self._reap(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self._reap(1)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (``kill -9``) the node and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self._reap(10)

    def restart(self, timeout: float = READY_TIMEOUT) -> "NodeProcess":
        """Stop (gracefully, if still running) and start again: same port, same data dir."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def all_running(nodes: Sequence[NodeProcess]) -> Iterator[Sequence[NodeProcess]]:
    """Start every node; on the way out kill -9 them all, whatever state they are in (SIGKILL
    also ends a SIGSTOPped process)."""
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.kill()
