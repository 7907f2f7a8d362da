"""One result format: scenarios return `Row`s; the harness prints one table and writes JSON."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Row:
    """One measured figure. `peer` is the same figure of the peer (CNCF Distribution, or the
    baseline named in the metric) from the same run; `ratio` = value / peer."""
    benchmark: str
    metric: str
    value: float | str | None
    unit: str = ""
    target: str = "info"
    passed: bool | None = None          # None: information only
    note: str = ""
    error: str = ""
    peer: float | None = None

    @property
    def ratio(self) -> float | None:
        if not isinstance(self.value, (int, float)) or not self.peer:
            return None
        return self.value / self.peer

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        if self.passed is None:
            return "info"
        return "pass" if self.passed else "FAIL"

    def as_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio, "verdict": self.verdict}


def compared(benchmark: str, metric: str, unit: str, ours: float | None, peer: float | None, *,
             min_ratio: float | None = None, max_value: float | None = None, **kw) -> Row:
    """A row judged against a minimum ratio to the peer, or a maximum value, or neither."""
    row = Row(benchmark, metric, ours, unit, peer=peer, **kw)
    if min_ratio is not None:
        row.target = f">= {min_ratio:g}x"
        row.passed = None if row.ratio is None else row.ratio >= min_ratio
    elif max_value is not None:
        row.target = f"< {max_value:g} {unit}"
        row.passed = None if ours is None else ours < max_value
    return row


def failed(benchmark: str, exc: BaseException) -> Row:
    return Row(benchmark, "(benchmark failed)", None, error=f"{type(exc).__name__}: {exc}")


def median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(1, math.ceil(p / 100.0 * len(ordered))) - 1]


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,} {unit}".rstrip()
    if unit in ("req/s", "MB/s", "MB", "ms") and abs(v) >= 100:
        return f"{v:,.0f} {unit}"
    if unit == "cpu-s/GB":
        return f"{v:.3f} {unit}"
    if unit in ("x", "%"):
        return f"{v:.2f}{unit}"
    return f"{v:,.2f} {unit}".rstrip()


def table(rows: list[Row], peer_name: str = "peer") -> str:
    with_peer = any(r.peer is not None for r in rows)
    head = ["benchmark", "metric", "value", *([peer_name, "ratio"] if with_peer else []), "target", "result"]
    body = []
    for r in rows:
        peer = [fmt(r.peer, r.unit), "-" if r.ratio is None else f"{r.ratio:.2f}x"] if with_peer else []
        body.append([r.benchmark, r.metric, fmt(r.value, r.unit), *peer, r.target, r.verdict])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    notes = [f"- {r.benchmark} / {r.metric}: {r.note}" for r in rows if r.note]
    errors = [f"- {r.benchmark} / {r.metric}: ERROR {r.error}" for r in rows if r.error]
    return "\n".join([line(head), sep, *(line(b) for b in body), "", *notes, *errors])


def write_json(scenario: str, rows: list[Row], details: dict, machine: dict, path: Path | None = None) -> Path:
    """bench/results/<scenario>-<timestamp>.json unless `path` is given."""
    if path is None:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{scenario}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    doc = {"scenario": scenario, "machine": machine, "rows": [r.as_dict() for r in rows], "details": details}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path
