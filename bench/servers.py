"""Start and stop the two registries under test, on loopback only.

Both are context managers yielding a ``Server`` with ``.url``, ``.pid`` and
``.restart()``.  Every process started here is stopped by its pid on exit
(SIGTERM, then SIGKILL after a grace period), and so are any children it left
behind (cargohold's private etcd).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- /proc helpers

def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (all threads), from /proc."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants_of(pid: int) -> list[int]:
    seen: list[int] = []
    todo = children_of(pid)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo.extend(children_of(p))
    return seen


def proc_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...), in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by ``pid`` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return int(st[11]) / tck, int(st[12]) / tck


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pin(pids: list[int], cpus: str) -> None:
    """Pin every thread of every pid in ``pids`` to ``cpus`` (taskset -a)."""
    for p in pids:
        subprocess.run(["taskset", "-a", "-c", "-p", cpus, str(p)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


# --------------------------------------------------------------------------- base class

@dataclass
class Server:
    kind: ClassVar[str] = "?"      # "distribution" or "cargohold"
    workdir: Path
    cpus: str | None = None        # taskset -c list applied to the whole process tree
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _known_children: set[int] = field(default_factory=set)
    starts: int = 0
    last_ready_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # subclasses fill these in
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_path(self) -> str:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready_timeout(self) -> float:
        return 30.0

    def node_pids(self) -> list[int]:
        """The registry process(es) whose memory we report (never etcd)."""
        pids = [self.pid]
        for c in descendants_of(self.pid):
            if proc_comm(c) != "etcd":
                pids.append(c)
        return pids

    def rss_kib(self) -> dict[str, int]:
        rss = hwm = 0
        for p in self.node_pids():
            rss += proc_status_kib(p, "VmRSS") or 0
            hwm += proc_status_kib(p, "VmHWM") or 0
        return {"rss_kib": rss, "hwm_kib": hwm, "pids": len(self.node_pids())}

    def tree_cpu(self) -> dict[str, float]:
        """CPU seconds of the registry and everything it started (a private etcd too)."""
        user = system = 0.0
        for p in [self.pid, *descendants_of(self.pid)]:
            u, s = cpu_seconds(p)
            user += u
            system += s
        return {"user": user, "sys": system}

    def main_thread_cpu(self) -> float:
        """CPU seconds (user + sys) of the registry's main thread (tid == pid) alone."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        self.starts += 1
        self.log_path = self.workdir / f"{self.kind}.{self.starts}.log"
        cmd = self.command()
        if self.cpus:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(self.workdir), env=self.env(), start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.last_ready_s = time.perf_counter() - t0
        self._known_children.update(descendants_of(self.pid))

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.ready_timeout()
        url = self.url + self.ready_path()
        last = "no answer"
        with httpx.Client(timeout=2.0) as c:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.kind} exited with {self.proc.returncode} before ready; "
                        f"log {self.log_path}:\n{self.log_tail()}")
                try:
                    r = c.get(url)
                    if r.status_code == 200:
                        return
                    last = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    last = type(e).__name__
                time.sleep(0.05)
        raise TimeoutError(f"{self.kind} not ready after {self.ready_timeout():.0f}s "
                           f"({last}); log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None:
            return
        self._known_children.update(descendants_of(self.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"  ! {self.kind} pid {self.pid} ignored SIGTERM for {grace:.0f}s; SIGKILL",
                      file=sys.stderr)
                self.proc.kill()
                self.proc.wait(10)
        # anything it started and did not stop (e.g. a private etcd): by pid, ours only
        leftovers = [p for p in self._known_children if alive(p)]
        if leftovers:
            time.sleep(2.0)
            leftovers = [p for p in leftovers if alive(p)]
        for p in leftovers:
            print(f"  ! {self.kind} left child {p} ({proc_comm(p)}) running; stopping it",
                  file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        deadline = time.time() + 10
        while any(alive(p) for p in leftovers) and time.time() < deadline:
            time.sleep(0.1)
        for p in leftovers:
            if alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        self._known_children.clear()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port and data (the read model is rebuilt)."""
        self.stop()
        self.start()

    def pin_tree(self, cpus: str) -> None:
        pin([self.pid, *descendants_of(self.pid)], cpus)


# --------------------------------------------------------------------------- distribution

DISTRIBUTION_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
"""


@dataclass
class Distribution(Server):
    kind: ClassVar[str] = "distribution"

    def command(self) -> list[str]:
        root = self.workdir / "distribution-data"
        root.mkdir(exist_ok=True)
        cfg = self.workdir / "distribution.yml"
        cfg.write_text(DISTRIBUTION_CONFIG.format(root=root, port=self.port))
        return [DISTRIBUTION_BIN, "serve", str(cfg)]

    def ready_path(self) -> str:
        return "/v2/"


# --------------------------------------------------------------------------- cargohold

def cargohold_python() -> str:
    return os.environ.get("CARGOHOLD_BENCH_PYTHON", sys.executable)


def cargohold_help() -> tuple[bool, str]:
    """(works, help text) of ``python -m cargohold serve --help``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        r = subprocess.run([cargohold_python(), "-m", "cargohold", "serve", "--help"],
                           cwd=str(REPO_ROOT), env=env, capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    return r.returncode == 0, (r.stdout + r.stderr)


@dataclass
class Cargohold(Server):
    kind: ClassVar[str] = "cargohold"
    runtime: str | None = "asyncio"
    extra_args: tuple[str, ...] = ()

    def command(self) -> list[str]:
        data = self.workdir / "cargohold-data"
        data.mkdir(exist_ok=True)
        cmd = [cargohold_python(), "-m", "cargohold", "serve",
               "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(data)]
        if self.runtime:
            cmd += ["--runtime", self.runtime]
        return [*cmd, *self.extra_args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def ready_path(self) -> str:
        return "/readyz"

    def ready_timeout(self) -> float:
        return 120.0


# --------------------------------------------------------------------------- factories

@contextlib.contextmanager
def running(kind: str, base: Path, *, cpus: str | None = None, runtime: str | None = None,
            keep_data: bool = False):
    """Start a fresh server of ``kind`` with its own empty data dir under ``base``."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    if kind == "distribution":
        srv: Server = Distribution(workdir=workdir, cpus=cpus)
    elif kind == "cargohold":
        srv = Cargohold(workdir=workdir, cpus=cpus, runtime=runtime)
    else:
        raise ValueError(kind)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        if not keep_data:
            # blobs are big and the disk is shared: drop the data now, keep the logs
            for d in ("distribution-data", "cargohold-data"):
                shutil.rmtree(workdir / d, ignore_errors=True)
