"""The audit log (issue 6): one JSON line per event, chained by hashes.

Events: login, login_failed, auth_failed (a refused token or a malformed `Authorization`
header), denied, push (a manifest), upload (a blob), mount, upload_cancelled, delete, admin,
config, unlocked (`cargohold user unlock`), and suppressed (see below). Each line holds `time`,
`seq`, `node`, `event`, `subject`, `client` and the event's fields (repository, reference,
digest, ...), then `prev` (the previous line's `hash`) and `hash`, the sha256 of the line's
canonical JSON without `hash`. So an edited line no longer matches its own hash, and a
removed, inserted or reordered line breaks the chain at the next one; `verify(path)`
(`cargohold audit verify FILE`) finds both. A chain without a secret cannot stop somebody who
rewrites every line after the one they changed, nor show that the newest lines were cut off:
ship the lines off the host (or keep the last hash that `verify` prints) for that.

`verify` checks the exact bytes that were hashed: a line must be precisely the canonical JSON
of its fields (sorted keys, no spaces, ASCII), and a JSON object with a key twice is refused,
so a line cannot be made to read differently (to a parser that keeps the first of two equal
keys) while still matching its hash.

Failures can come from anybody, so they cannot be allowed to fill the disk (an unauthenticated
request costs its sender nothing and the log ~360 bytes): the failure events (login_failed,
auth_failed, denied) pass a `FloodGate`: per failure class (event, reason, status) and
client address, at most `burst` lines per window; the rest are counted and reported by one
`suppressed` line when the window closes. Every distinct class of failure from every client
is still recorded at least once per window. Memory is bounded: past `max_keys` windows, new
clients share one window per class (client "*").

A node appends to the file it is given (continuing the chain of what is there) or writes to
stdout ("-"). Lines are written whole with one write() and not fsynced.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

GENESIS = "0" * 64
_TAIL = 64 * 1024
FAILURE_EVENTS = frozenset({"login_failed", "auth_failed", "denied"})
OVERFLOW_CLIENT = "*"


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hash(document: dict) -> str:
    return hashlib.sha256(_canonical(document)).hexdigest()


def _timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


@dataclass(slots=True)
class _Window:
    opened: float                      # monotonic
    opened_at: float                   # wall clock, for the summary line
    written: int = 0
    suppressed: int = 0


class FloodGate:
    """At most `burst` lines per key (failure class, client) per `window` seconds; what is held
    back is counted, and `closed()` hands out each finished window that held something back.
    Pure, with an injectable clock."""

    def __init__(self, burst: int = 20, window: float = 60.0, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self.wall = wall
        self._windows: dict[tuple, _Window] = {}     # in the order they opened, so oldest first

    def admit(self, failure: tuple, client: str) -> bool:
        """May a line for this failure class from this client be written now?"""
        key = (failure, client)
        found = self._windows.get(key)
        if found is None:
            if len(self._windows) >= self.max_keys:        # a flood from many addresses: share one window
                key = (failure, OVERFLOW_CLIENT)
                found = self._windows.get(key)
            if found is None:
                found = self._windows[key] = _Window(self.clock(), self.wall())
        if found.written < self.burst:
            found.written += 1
            return True
        found.suppressed += 1
        return False

    def closed(self, *, all_open: bool = False) -> list[tuple[tuple, str, _Window]]:
        """Remove the windows that have ended (or every window: at shutdown); return (failure,
        client, window) of each that held lines back."""
        horizon = float("inf") if all_open else self.clock() - self.window
        ended = []
        while self._windows:
            key, first = next(iter(self._windows.items()))
            if first.opened > horizon:
                break
            del self._windows[key]
            if first.suppressed:
                ended.append((key[0], key[1], first))
        return ended

    def next_close(self) -> float | None:
        """Seconds until the oldest window ends (None: no window is open)."""
        if not self._windows:
            return None
        first = next(iter(self._windows.values()))
        return max(0.0, first.opened + self.window - self.clock())


def failure_class(event: str, fields: dict) -> tuple:
    """What makes failures alike: the event, its reason and its status."""
    return (event, fields.get("reason"), fields.get("status"))


class AuditLog:
    def __init__(self, target: str | None, node: str = "", gate: FloodGate | None = None):
        """`target`: a file path, "-" for stdout, or None (no audit log). `gate` limits failure lines."""
        self.target = target
        self.node = node
        self.gate = gate or FloodGate()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0
        self._prev = GENESIS
        if target and target != "-":
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._continue_chain(target)

    @property
    def enabled(self) -> bool:
        return bool(self.target)

    def _continue_chain(self, path: str) -> None:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            lines = f.read().splitlines()
        for raw in reversed(lines):
            try:
                last = json.loads(raw)
                self._seq, self._prev = int(last["seq"]) + 1, str(last["hash"])
                return
            except (ValueError, KeyError, TypeError):
                continue

    def record(self, event: str, request=None, **fields) -> None:
        """Append one event. `request` (a node.http.Request) gives the subject and client address.
        Failure events pass the flood gate."""
        if not self.target:
            return
        document = {"time": _timestamp(time.time()), "node": self.node, "event": event}
        if request is not None:
            identity = getattr(request, "auth", None)
            document["subject"] = identity.subject.label if identity is not None else "anonymous"
            document["client"] = request.client
        document.update({k: v for k, v in fields.items() if v is not None})
        with self._lock:
            self._summarize_closed()
            if event in FAILURE_EVENTS and not self.gate.admit(failure_class(event, fields),
                                                                 document.get("client", "-")):
                return
            self._append(document)

    def flush(self, *, all_open: bool = False) -> float | None:
        """Write the summary of every flood window that has ended (with `all_open`, of every
        window: at shutdown); returns seconds until the next one ends (None: none is open). The
        node calls it when that time comes."""
        if not self.target:
            return None
        with self._lock:
            self._summarize_closed(all_open=all_open)
            return self.gate.next_close()

    def _summarize_closed(self, *, all_open: bool = False) -> None:
        for (event, reason, status), client, window in self.gate.closed(all_open=all_open):
            self._append({"time": _timestamp(time.time()), "node": self.node, "event": "suppressed",
                          "failure": event, "reason": reason, "status": status, "client": client,
                          "count": window.suppressed, "since": _timestamp(window.opened_at)})

    def _append(self, document: dict) -> None:
        """Chain and write one line (under the lock)."""
        document = {k: v for k, v in document.items() if v is not None}
        document["seq"], document["prev"] = self._seq, self._prev
        document["hash"] = digest = _hash(document)
        line = _canonical(document) + b"\n"
        if self._fd is not None:
            os.write(self._fd, line)
        else:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        self._seq, self._prev = self._seq + 1, digest

    def close(self) -> None:
        self.flush(all_open=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Verification:
    lines: int = 0
    last_hash: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key appears twice")
    return document


def _parse_line(raw: bytes) -> dict:
    """An audit line's fields; ValueError unless it is exactly the canonical JSON that was written
    (so the bytes checked are the bytes that were hashed) and no key appears twice."""
    document = json.loads(raw, object_pairs_hook=_unique_keys)
    line = raw[:-1] if raw.endswith(b"\n") else raw
    if not isinstance(document, dict) or _canonical(document) != line:
        raise ValueError("not the canonical form")
    return document


def verify(path: str) -> Verification:
    """Check every line's own hash and the chain from the first line (seq 0, prev = genesis)."""
    result = Verification()
    expected_seq, expected_prev = 0, GENESIS
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            result.lines = number
            try:
                document = json.loads(raw)
                claimed = document.pop("hash")
                seq, prev = document["seq"], document["prev"]
            except (ValueError, KeyError, TypeError, AttributeError):
                result.problems.append(f"line {number}: not an audit record")
                expected_prev = None
                continue
            try:
                _parse_line(raw)
                edited = _hash(document) != claimed
            except ValueError:
                edited = True          # re-encoded, or a key given twice: not the bytes that were hashed
            if edited:
                result.problems.append(f"line {number}: its content does not match its hash (edited)")
            if expected_prev is not None and prev != expected_prev:
                result.problems.append(f"line {number}: does not follow the previous line "
                                       "(a line was removed, inserted or reordered before it)")
            if seq != expected_seq:
                result.problems.append(f"line {number}: sequence {seq}, expected {expected_seq}")
            expected_seq = seq + 1 if isinstance(seq, int) else expected_seq + 1
            expected_prev = claimed
            result.last_hash = claimed
    return result
