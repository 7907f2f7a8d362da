"""A real etcd for tests: free loopback ports, a temp data dir, a synchronous API."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from cargohold.coordinator.embedded import (
    choose_ports,
    etcd_command,
    log_tail,
    spawn_etcd,
    stop_process,
    wait_until_healthy,
)


class EtcdProcess:
    """A real etcd on free loopback ports with a temp data dir, for tests. Sync API (usable from fixtures).

    The binary is ``etcd`` on PATH; its output goes to ``data_dir/etcd.log``.
    """

    def __init__(self, data_dir: Path, *, etcd_binary: str = "etcd") -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "etcd.log"
        self._binary = etcd_binary
        self.client_port, self.peer_port = choose_ports(None)
        self.url = f"http://127.0.0.1:{self.client_port}"
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start etcd and wait until it is healthy (at most 15 s)."""
        if self.running:
            return
        command = etcd_command(self._binary, self.data_dir / "data", self.client_port, self.peer_port)
        self._proc = spawn_etcd(command, self.log_path)
        try:
            wait_until_healthy(self._proc, self.url, self.log_path)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 10 s)."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL, wait."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        """Stop (SIGTERM) then start again on the same ports and data dir."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"EtcdProcess({self.url}, running={self.running})"
