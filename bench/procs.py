"""What the bench reads about processes and the machine, from /proc: CPU seconds, memory,
children; plus pinning, git and machine facts. One copy of each helper for every scenario
(free ports come from tests/support, which chooses them for every launched process)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_split(pid: int | None, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by `pid` (all threads), or by one thread `tid`."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = _stat_fields(path) if pid else None
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU seconds of a live process (all threads); 0 when it is gone."""
    return sum(cpu_split(pid))


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(x) for x in f.read().split())
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


def tree_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid` and everything it started."""
    parts = [cpu_split(p) for p in [pid, *descendants_of(pid)]]
    return sum(u for u, _ in parts), sum(s for _, s in parts)


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def status_kib(pid: int | None, key: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, TypeError):
        return None
    return None


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return fields is not None and fields[0] != "Z"


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace`: for processes a launched process left behind."""
    left = [p for p in pids if alive(p)]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in left:
        if alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def pin(pids: list[int], cpus: str) -> None:
    """Pin every thread of every pid to `cpus` (taskset -a)."""
    for p in pids:
        subprocess.run(["taskset", "-a", "-c", "-p", cpus, str(p)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot (idle includes iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK, idle / CLK_TCK


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (curl, the CLI, ...)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def git(*args: str, cwd: Path = REPO_ROOT) -> str:
    try:
        return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def export_commit(ref: str, dest: Path) -> tuple[Path, str]:
    """`git archive REF cargohold` unpacked under `dest`: (tree root, full commit id)."""
    sha = git("rev-parse", "--verify", ref + "^{commit}")
    if not sha:
        raise ValueError(f"unknown commit {ref!r}")
    root = dest / f"src-{sha[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", sha, "cargohold"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root, sha


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(),
            "cpu_model": model, "kernel": platform.release(), "python": sys.version.split()[0],
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "cargohold_uncommitted": git("status", "--porcelain", "--", "cargohold").splitlines(),
            "loadavg_start": loadavg()}
