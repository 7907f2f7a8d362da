"""Issue 12, the protocol side (pure, fake clocks): the dummy hash for unknown names, the audit
log's strict verification and its flood gate, forwarding headers from trusted proxies only,
the recent-login exemption, and the password stamp in tokens."""

from __future__ import annotations

import json
import time

import bcrypt
import pytest

from cargohold import config
from cargohold.auth.audit import AuditLog, FloodGate, verify
from cargohold.auth.clients import TrustedProxies
from cargohold.auth.passwords import DEFAULT_COST, dummy_hash, hash_cost, hash_password
from cargohold.auth.ratelimit import FailureLimiter, RecentLogins
from cargohold.auth.subjects import Subject
from cargohold.auth.tokens import STAMP_CLAIM, credential_stamp, token_claims


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- item 8: login timing
def _check_seconds(hashed: str) -> float:
    started = time.perf_counter()
    try:
        bcrypt.checkpw(b"a wrong password", hashed.encode())
    except ValueError:                 # a malformed hash fails at once: what issue 12 found
        pass
    return time.perf_counter() - started


def test_the_dummy_hash_is_a_real_bcrypt_hash_of_the_configured_cost():
    dummy = dummy_hash(DEFAULT_COST)
    assert hash_cost(dummy) == DEFAULT_COST
    real = hash_password("a real password", DEFAULT_COST)
    # Alternate the two and keep each one's fastest time, so a busy machine slows both alike.
    times = {dummy: [], real: []}
    for _ in range(5):
        for hashed in times:
            times[hashed].append(_check_seconds(hashed))
    ratio = min(times[dummy]) / min(times[real])     # checkpw really runs the key schedule
    assert 0.6 < ratio < 1.6, ratio
    assert hash_cost(dummy_hash(4)) == 4 and dummy_hash(4) == dummy_hash(4)   # made once per cost


# ---------------------------------------------------------------- item 12: verify the hashed bytes
def _log(path, events=3) -> list[bytes]:
    log = AuditLog(str(path), node="n1")
    for i in range(events):
        log.record("push", repository=f"r{i}", reference="latest")
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def test_a_line_with_a_prepended_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "audit.log"
    lines = _log(path)
    assert verify(str(path)).ok
    lines[1] = b'{"repository":"innocent",' + lines[1][1:]      # a reader keeping the first key sees this
    path.write_bytes(b"".join(lines))
    result = verify(str(path))
    assert not result.ok and any("line 2" in p and "edited" in p for p in result.problems), result.problems


def test_a_re_encoded_line_is_refused(tmp_path):
    path = tmp_path / "audit.log"
    lines = _log(path)
    lines[0] = json.dumps(json.loads(lines[0])).encode() + b"\n"    # same fields, other bytes
    path.write_bytes(b"".join(lines))
    result = verify(str(path))
    assert not result.ok and any("line 1" in p for p in result.problems)


# ---------------------------------------------------------------- item 9: floods cannot fill the disk
def test_flood_gate_admits_a_burst_per_class_and_client_then_counts():
    clock = Clock()
    gate = FloodGate(3, 10.0, clock=clock)
    failure = ("denied", None, 401)
    assert [gate.admit(failure, "10.0.0.1") for _ in range(5)] == [True] * 3 + [False] * 2
    assert gate.admit(failure, "10.0.0.2")                      # another client
    assert gate.admit(("login_failed", None, None), "10.0.0.1")  # another class
    assert gate.closed() == [] and gate.next_close() == 10.0
    clock.now += 10.0
    [(closed_failure, client, window)] = gate.closed()           # only the window that held lines back
    assert (closed_failure, client, window.suppressed) == (failure, "10.0.0.1", 2)
    assert gate.next_close() is None and gate.admit(failure, "10.0.0.1")


def test_flood_gate_memory_is_bounded():
    gate = FloodGate(1, 60.0, max_keys=100, clock=Clock())
    failure = ("auth_failed", "malformed authorization", 401)
    admitted = sum(gate.admit(failure, f"10.0.{i // 256}.{i % 256}") for i in range(5000))
    assert len(gate._windows) <= 101 and admitted == 101         # 100 clients, then one shared window


def test_a_flood_of_failures_writes_a_bounded_log_that_still_verifies(tmp_path):
    path = tmp_path / "audit.log"
    clock = Clock()
    log = AuditLog(str(path), "n1", FloodGate(5, 60.0, clock=clock))
    for _ in range(1000):
        log.record("denied", status=401, action="pull", repository="x")
    log.record("login_failed", account="alice")                   # a different class still gets through
    log.record("push", repository="x", reference="v1")            # never gated
    clock.now += 60.0
    assert log.flush() is None
    log.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["denied"] * 5 + ["login_failed", "push", "suppressed"]
    assert events[-1]["count"] == 995 and events[-1]["failure"] == "denied" and events[-1]["status"] == 401
    assert verify(str(path)).ok


def test_closing_the_log_summarizes_open_windows(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), "n1", FloodGate(1, 60.0, clock=Clock()))
    for _ in range(3):
        log.record("auth_failed", reason="token: expired", status=401)
    log.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["auth_failed", "suppressed"] and events[1]["count"] == 2


# ---------------------------------------------------------------- item 15: trusted proxies only
def test_forwarded_for_is_believed_only_from_trusted_proxies():
    nobody = TrustedProxies()
    assert nobody.client("127.0.0.1", ["6.6.6.6"]) == "127.0.0.1"
    proxies = TrustedProxies(["10.0.0.0/8", "::1"])
    assert proxies.client("192.0.2.9", ["6.6.6.6"]) == "192.0.2.9"              # not a proxy: ignored
    assert proxies.client("10.1.2.3", ["198.51.100.7"]) == "198.51.100.7"
    # The rightmost untrusted hop: what a client wrote to the left of it is not believed.
    assert proxies.client("10.1.2.3", ["6.6.6.6, 198.51.100.7, 10.9.9.9"]) == "198.51.100.7"
    assert proxies.client("10.1.2.3", ["6.6.6.6", "198.51.100.7"]) == "198.51.100.7"   # several headers
    assert proxies.client("::1", ["2001:db8::5"]) == "2001:db8::5"
    assert proxies.client("10.1.2.3", ["not-an-address"]) == "10.1.2.3"
    assert proxies.client("10.1.2.3", ["10.4.4.4"]) == "10.4.4.4"                # only proxies: the first
    assert proxies.trusts("::ffff:10.0.0.1") and not proxies.trusts("garbage")


def test_trusted_proxies_setting_is_validated():
    settings = config.load(None, {"trusted_proxies": "10.0.0.0/8, 192.0.2.1"}, {})
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.0.2.1"] and config.Settings().trusted_proxies == []
    with pytest.raises(config.ConfigError, match="trusted_proxies"):
        config.load(None, {"trusted_proxies": "10.0.0.0/33"}, {})


# ---------------------------------------------------------------- item 17: locks and their owners
def test_recent_logins_remember_addresses_per_account_bounded():
    clock = Clock()
    recent = RecentLogins(100.0, per_account=2, max_accounts=2, clock=clock)
    recent.succeeded("alice", "10.0.0.1")
    recent.succeeded("alice", "10.0.0.2")
    recent.succeeded("alice", "10.0.0.3")                        # the oldest address goes
    assert not recent.knows("alice", "10.0.0.1") and recent.knows("alice", "10.0.0.3")
    recent.succeeded("bob", "10.0.0.1")
    recent.succeeded("carol", "10.0.0.1")                        # the least recently active account goes
    assert not recent.knows("alice", "10.0.0.3") and recent.knows("bob", "10.0.0.1")
    clock.now += 101.0
    assert not recent.knows("bob", "10.0.0.1")


def test_a_limiter_key_can_be_cleared():
    limiter = FailureLimiter(2, 60.0, clock=Clock())
    limiter.failed("alice")
    limiter.failed("alice")
    assert limiter.retry_after("alice")
    limiter.clear("alice")
    assert limiter.retry_after("alice") is None


# ---------------------------------------------------------------- item 1: a token names its password
def test_tokens_carry_a_stamp_of_the_password_hash():
    first, second = hash_password("first password", 4), hash_password("first password", 4)
    assert credential_stamp(first) == credential_stamp(first) != credential_stamp(second)   # new salt: new stamp
    alice = Subject("user", "alice")
    assert token_claims(alice, [], "svc", 300, 0, credential_stamp(first))[STAMP_CLAIM] == credential_stamp(first)
    assert STAMP_CLAIM not in token_claims(Subject("anonymous"), [], "svc", 300, 0)
