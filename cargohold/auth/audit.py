"""The audit log (issue 6): one JSON line per event, chained by hashes.

Events: login, login_failed, denied, push, delete, admin, config. Each line holds `time`,
`seq`, `node`, `event`, `subject`, `client` and the event's fields (repository, reference,
digest, ...), then `prev` (the previous line's `hash`) and `hash`, the sha256 of the line's
canonical JSON without `hash`. So an edited line no longer matches its own hash, and a
removed, inserted or reordered line breaks the chain at the next one; `verify(path)`
(`cargohold audit verify FILE`) finds both. A chain without a secret cannot stop somebody who
rewrites every line after the one they changed, nor show that the newest lines were cut off:
ship the lines off the host (or keep the last hash that `verify` prints) for that.

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

GENESIS = "0" * 64
_TAIL = 64 * 1024


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hash(document: dict) -> str:
    return hashlib.sha256(_canonical(document)).hexdigest()


class AuditLog:
    def __init__(self, target: str | None, node: str = ""):
        """`target`: a file path, "-" for stdout, or None (no audit log)."""
        self.target = target
        self.node = node
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
        """Append one event. `request` (a node.http.Request) gives the subject and client address."""
        if not self.target:
            return
        now = time.time()
        document = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                    "node": self.node, "event": event}
        if request is not None:
            identity = getattr(request, "auth", None)
            document["subject"] = identity.subject.label if identity is not None else "anonymous"
            document["client"] = request.client
        document.update({k: v for k, v in fields.items() if v is not None})
        with self._lock:
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
            if _hash(document) != claimed:
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
