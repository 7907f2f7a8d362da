"""py-spy sampling of the cargohold node while a benchmark runs (``--profile DIR``).

``py-spy record --format raw`` writes collapsed stacks ("f1;f2;f3 N"); we keep
the file (feed it to flamegraph.pl or speedscope) and print the functions with
the most samples on top of the stack (self) and anywhere on it (total).
"""

from __future__ import annotations

import collections
import signal
import subprocess
import time
from pathlib import Path


def start(ctx, srv, name: str):
    ctx.profile_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%H%M%S')}-pid{srv.pid}"
    raw = ctx.profile_dir / f"{stem}.txt"
    svg = ctx.profile_dir / f"{stem}.svg"
    log = open(ctx.profile_dir / f"{stem}.log", "wb")
    cmd = [ctx.pyspy, "record", "--pid", str(srv.pid), "--rate", "250", "--format", "raw",
           "--output", str(raw), "--duration", "3600", "--nonblocking", "--threads"]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    time.sleep(1.0)  # let py-spy attach before the load starts
    ctx.log(f"[profile] py-spy pid {p.pid} sampling node pid {srv.pid} -> {raw}")

    def stop() -> dict:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if not raw.exists():
            return {"error": f"py-spy wrote nothing; see {raw.with_suffix('.log')}"}
        summary = summarize(raw)
        summary["raw"] = str(raw)
        # a flame graph too, from the same samples, if the tool can convert (best effort)
        summary["svg"] = str(svg) if _to_svg(raw, svg) else None
        ctx.log(format_summary(name, summary))
        return summary

    return stop


def _to_svg(raw: Path, svg: Path) -> bool:
    try:
        import shutil
        fg = shutil.which("flamegraph.pl") or shutil.which("flamegraph")
        if not fg:
            return False
        with open(svg, "wb") as out:
            return subprocess.run([fg, str(raw)], stdout=out, timeout=120).returncode == 0
    except Exception:  # noqa: BLE001
        return False


def _short(frame: str) -> str:
    # py-spy raw frames look like "handle (cargohold/node/app.py:123)"
    fn, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path, _, _line = loc.rpartition(":")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{fn} ({path})" if path else fn


def summarize(raw: Path, top: int = 25) -> dict:
    self_c: collections.Counter = collections.Counter()
    total_c: collections.Counter = collections.Counter()
    files_c: collections.Counter = collections.Counter()
    n = 0
    idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("thread (") and not f.startswith("process ")]
        if not frames:
            continue
        n += c
        leaf = frames[-1]
        self_c[leaf] += c
        if any(k in leaf for k in ("select (", "epoll", "_run_once (asyncio", "poll (")) or \
                leaf.startswith("wait (") or leaf.startswith("_worker (concurrent"):
            idle += c
        for f in set(frames):
            total_c[f] += c
        files = {f.rpartition(" (")[2].rstrip(")").split("/")[0] for f in frames}
        for f in files:
            files_c[f] += c
    pct = (lambda c: round(100.0 * c / n, 1)) if n else (lambda c: 0.0)
    return {
        "samples": n,
        "idle_pct": pct(idle),
        "top_self": [(f, pct(c)) for f, c in self_c.most_common(top)],
        "top_total": [(f, pct(c)) for f, c in total_c.most_common(top)],
        "by_package": [(f, pct(c)) for f, c in files_c.most_common(15)],
    }


def format_summary(name: str, s: dict, top: int = 20) -> str:
    if "error" in s:
        return f"[profile {name}] {s['error']}"
    out = [f"[profile {name}] {s['samples']} samples (all threads), "
           f"~{s['idle_pct']}% in idle/wait leaves; raw stacks {s.get('raw')}"]
    out.append("  self %   function (top of stack)")
    out += [f"  {p:6.1f}  {f}" for f, p in s["top_self"][:top]]
    out.append("  total %  function (anywhere on the stack)")
    out += [f"  {p:6.1f}  {f}" for f, p in s["top_total"][:top]]
    return "\n".join(out)
