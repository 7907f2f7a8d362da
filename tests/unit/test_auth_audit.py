"""The audit log's hash chain and the failed-login limiter (pure, with a fake clock)."""

import json

import pytest

from cargohold.auth.audit import AuditLog, verify
from cargohold.auth.ratelimit import FailureLimiter, parse_rate


def _write(path, events=5):
    log = AuditLog(str(path), node="n1")
    for i in range(events):
        log.record("push", repository=f"r{i}", reference="latest", digest="sha256:" + "a" * 64)
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def test_chain_verifies_and_continues_across_restarts(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 3)
    log = AuditLog(str(path), node="n1")         # a restarted node continues the chain
    log.record("delete", repository="r", reference="x")
    log.close()
    result = verify(str(path))
    assert result.ok and result.lines == 4, result.problems
    last = json.loads(path.read_bytes().splitlines()[-1])
    assert last["seq"] == 3 and result.last_hash == last["hash"] and last["event"] == "delete"


def test_edited_line_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    lines = _write(path)
    lines[2] = lines[2].replace(b'"r2"', b'"r9"')
    path.write_bytes(b"".join(lines))
    result = verify(str(path))
    assert not result.ok and any("line 3" in p and "edited" in p for p in result.problems)


def test_edited_last_line_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    lines = _write(path)
    lines[-1] = lines[-1].replace(b'"push"', b'"pull"')
    path.write_bytes(b"".join(lines))
    assert not verify(str(path)).ok


def test_edit_with_recomputed_hash_breaks_the_chain(tmp_path):
    import hashlib

    path = tmp_path / "audit.log"
    lines = _write(path)
    document = json.loads(lines[1])
    document["repository"] = "elsewhere"
    del document["hash"]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    document["hash"] = hashlib.sha256(canonical).hexdigest()
    lines[1] = json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    result = verify(str(path))
    assert not result.ok and any(p.startswith("line 3") for p in result.problems)


@pytest.mark.parametrize("damage", ["remove-middle", "remove-first", "reorder", "insert-copy", "garbage"])
def test_removed_reordered_or_inserted_lines_are_detected(tmp_path, damage):
    path = tmp_path / "audit.log"
    lines = _write(path)
    if damage == "remove-middle":
        del lines[2]
    elif damage == "remove-first":
        del lines[0]
    elif damage == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif damage == "insert-copy":
        lines.insert(3, lines[1])
    else:
        lines.insert(2, b"not json\n")
    path.write_bytes(b"".join(lines))
    assert not verify(str(path)).ok


def test_request_fields_and_no_log(tmp_path):
    class Req:
        client = "10.1.2.3"
        auth = None

    path = tmp_path / "a.log"
    log = AuditLog(str(path), node="n2")
    log.record("denied", Req(), repository="x", status=401, reason=None)
    log.close()
    document = json.loads(path.read_text())
    assert document["client"] == "10.1.2.3" and document["subject"] == "anonymous" and "reason" not in document
    AuditLog(None).record("push", Req())          # disabled: no file, no error


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_limiter_sliding_window():
    clock = Clock()
    limiter = FailureLimiter(3, 60, clock=clock)
    for _ in range(2):
        limiter.failed("alice")
        assert limiter.retry_after("alice") is None
    clock.now += 10
    limiter.failed("alice")
    assert limiter.retry_after("alice") == pytest.approx(50)
    assert limiter.retry_after("bob") is None
    clock.now += 50.5                             # the first two failures left the window
    assert limiter.retry_after("alice") is None
    limiter.failed("alice")
    limiter.failed("alice")
    assert limiter.retry_after("alice") == pytest.approx(9.5)        # until the failure at +10 s leaves


def test_limiter_memory_is_bounded():
    clock = Clock()
    limiter = FailureLimiter(2, 60, max_keys=100, clock=clock)
    for i in range(1000):
        limiter.failed(f"user{i}")
        clock.now += 0.001
    assert len(limiter._failures) <= 100


def test_parse_rate():
    assert parse_rate("10/300") == (10, 300.0)
    for bad in ("10", "0/60", "x/60", "5/0", "5/-1", "5/100000"):
        with pytest.raises(ValueError):
            parse_rate(bad)
