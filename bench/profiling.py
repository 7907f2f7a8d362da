"""py-spy sampling of the cargohold node while a benchmark runs (``--profile DIR``).

``py-spy record --format raw`` writes collapsed stacks ("f1;f2;f3 N"); we keep
the file (feed it to flamegraph.pl or speedscope) and print the functions with
the most samples on top of the stack (self) and anywhere on it (total).
"""

from __future__ import annotations

import collections
import contextlib
import signal
import subprocess
import time
from pathlib import Path

RATE = 250  # samples/s per thread


def start(ctx, srv, name: str):
    ctx.profile_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%H%M%S')}-pid{srv.pid}"
    raw = ctx.profile_dir / f"{stem}.txt"
    svg = ctx.profile_dir / f"{stem}.svg"
    log = open(ctx.profile_dir / f"{stem}.log", "wb")
    cmd = [ctx.pyspy, "record", "--pid", str(srv.pid), "--rate", str(RATE), "--format", "raw",
           "--output", str(raw), "--duration", "3600", "--nonblocking", "--threads"]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    time.sleep(1.5)  # let py-spy attach before the measured part starts
    ctx.log(f"[profile] py-spy pid {p.pid} sampling node pid {srv.pid} -> {raw}")
    t0 = time.perf_counter()

    def stop() -> dict:
        window = time.perf_counter() - t0
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if not raw.exists():
            return {"error": f"py-spy wrote nothing; see {raw.with_suffix('.log')}"}
        summary = summarize(raw, window)
        summary["raw"] = str(raw)
        # a flame graph too, from the same samples, if the tool can convert (best effort)
        summary["svg"] = str(svg) if _to_svg(raw, svg) else None
        ctx.log(format_summary(name, summary))
        return summary

    return stop


@contextlib.contextmanager
def window(ctx, srv, name: str):
    """Profile the node only while the block runs (no-op unless --profile)."""
    if not ctx.profile_dir or srv.kind != "cargohold":
        yield
        return
    stop = start(ctx, srv, name)
    try:
        yield
    finally:
        ctx.raw.setdefault("profiles", {})[f"{name}-{len(ctx.raw.get('profiles', {}))}"] = stop()


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


def summarize(raw: Path, window_s: float, top: int = 25) -> dict:
    """Per-thread busy time and the hottest functions, main (event loop) thread apart.

    py-spy (without --idle) only records a thread while it runs or is runnable, so
    samples / (RATE x window) is the share of wall time that thread was busy.
    """
    self_main: collections.Counter = collections.Counter()
    self_other: collections.Counter = collections.Counter()
    total_main: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    n = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        parts = stack.split(";")
        thread = parts[0] if parts[0].startswith("thread (") else "?"
        frames = [_short(f) for f in parts if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        n += c
        main = thread.endswith("MainThread")
        threads["MainThread" if main else thread.split(": ", 1)[-1]] += c
        (self_main if main else self_other)[frames[-1]] += c
        if main:
            for f in set(frames):
                total_main[f] += c
    per_s = RATE * window_s
    main_n = threads.get("MainThread", 0)
    pct = (lambda c, d: round(100.0 * c / d, 1) if d else 0.0)
    return {
        "window_s": round(window_s, 2),
        "samples": n,
        "busy_pct_of_wall": {t: pct(c, per_s) for t, c in threads.most_common()},
        "main_self": [(f, pct(c, main_n)) for f, c in self_main.most_common(top)],
        "main_total": [(f, pct(c, main_n)) for f, c in total_main.most_common(top)],
        "other_self": [(f, pct(c, n - main_n)) for f, c in self_other.most_common(top)],
    }


def format_summary(name: str, s: dict, top: int = 15) -> str:
    if "error" in s:
        return f"[profile {name}] {s['error']}"
    busy = ", ".join(f"{t} {p}%" for t, p in s["busy_pct_of_wall"].items())
    out = [f"[profile {name}] {s['window_s']}s window, {s['samples']} samples; "
           f"busy share of wall time per thread kind: {busy}",
           f"  raw stacks: {s.get('raw')}",
           "  main (event loop) thread, self %  [native code shows as its Python caller]"]
    out += [f"  {p:6.1f}  {f}" for f, p in s["main_self"][:top]]
    out.append("  main thread, total % (on the stack)")
    out += [f"  {p:6.1f}  {f}" for f, p in s["main_total"][:top] if p < 99.5]
    out.append("  other threads, self %")
    out += [f"  {p:6.1f}  {f}" for f, p in s["other_self"][:8]]
    return "\n".join(out)
