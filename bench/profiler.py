"""The profiler hook: `py-spy record` of some processes while a step runs, and one summary.

py-spy is not a project dependency: `python3 -m venv /work/pyspy-venv &&
/work/pyspy-venv/bin/pip install py-spy`, then `--profile DIR --py-spy /work/pyspy-venv/bin/py-spy`.
Raw collapsed stacks (`thread (tid): name;frame;...;frame N`) are kept in the output directory."""

from __future__ import annotations

import collections
import signal
import subprocess
import time
from pathlib import Path

RATE = 250          # samples/s per thread
MODES = {"oncpu": [], "idle": ["--idle"], "gil": ["--gil"]}


class Profiler:
    """A context manager: `with Profiler(...) as prof: prof.add("n1", pid); ...`; summaries
    (by label) are in `prof.summaries` afterwards. Disabled (does nothing) when `pyspy` is None."""

    def __init__(self, pyspy: str | None, out_dir: Path, name: str, mode: str = "oncpu", rate: int = RATE):
        self.pyspy, self.out_dir, self.name, self.mode, self.rate = pyspy, Path(out_dir), name, mode, rate
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.summaries: dict[str, dict] = {}
        self.started = 0.0

    def add(self, label: str, pid: int | None) -> None:
        if not self.pyspy or pid is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{self.name}-{label}-{time.strftime('%H%M%S')}.txt"
        cmd = [self.pyspy, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
               "--output", str(out), "--threads", "--nonblocking", *MODES[self.mode]]
        self.procs.append((label, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))

    def __enter__(self) -> "Profiler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Profiler":
        self.started = time.perf_counter()
        return self

    def stop(self, label: str | None = None) -> dict[str, dict]:
        """Stops every py-spy (or the one of `label`); prints and returns the summaries."""
        window = time.perf_counter() - self.started
        stopping = [p for p in self.procs if label is None or p[0] == label]
        self.procs = [p for p in self.procs if p not in stopping]
        for _, proc, _ in stopping:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for label, proc, out in stopping:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if out.exists():
                self.summaries[label] = summarize(out, window, self.rate) | {"raw": str(out)}
                print(format_summary(f"{self.name} {label}", self.summaries[label]), flush=True)
        return self.summaries


def _short(frame: str) -> str:
    """`fn (…/site-packages/pkg/mod.py:12)` -> `fn (pkg/mod.py)`."""
    fn, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    return f"{fn} ({'/'.join(path.split('/')[-2:])})" if path else fn


def summarize(raw: Path, window_s: float, rate: int = RATE, top: int = 20) -> dict:
    """Samples per thread (as % of wall time: without --idle py-spy records a thread only while
    it runs), the hottest frames of the main (event loop) thread and of the others, and the
    cargohold functions by inclusive share."""
    threads, main_self, main_total, other_self, ours = (collections.Counter() for _ in range(5))
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, parts = int(count), stack.split(";")
        thread = parts[0].partition("): ")[2] if parts[0].startswith("thread (") else "?"
        frames = [f for f in parts if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += n
        main = thread == "MainThread"
        threads["AnyIO worker threads" if thread.startswith("AnyIO worker") else thread] += n
        (main_self if main else other_self)[_short(frames[-1])] += n
        if main:
            main_total.update(dict.fromkeys({_short(f) for f in frames}, n))
        ours.update(dict.fromkeys({_short(f) for f in frames if "cargohold/" in f}, n))

    def share(counter, of):
        return [(k, round(100.0 * v / of, 1)) for k, v in counter.most_common(top)] if of else []

    return {"window_s": round(window_s, 2), "samples": total,
            "busy_pct_of_wall": dict(share(threads, rate * window_s)),
            "main_self": share(main_self, threads["MainThread"]),
            "main_total": share(main_total, threads["MainThread"]),
            "other_self": share(other_self, total - threads["MainThread"]),
            "cargohold_inclusive": share(ours, total)}


def format_summary(name: str, s: dict, top: int = 12) -> str:
    busy = ", ".join(f"{t} {p}%" for t, p in s["busy_pct_of_wall"].items())
    out = [f"[profile {name}] {s['window_s']}s, {s['samples']} samples; % of wall per thread: {busy}",
           f"  raw stacks: {s.get('raw')}"]
    for title, key in (("main thread, self", "main_self"), ("main thread, total", "main_total"),
                       ("other threads, self", "other_self"), ("cargohold, inclusive", "cargohold_inclusive")):
        out.append(f"  {title} %")
        out += [f"  {p:6.1f}  {f}" for f, p in s[key][:top]]
    return "\n".join(out)
