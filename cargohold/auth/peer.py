"""The node-to-node credential (issue 12): every gRPC call between nodes carries an HMAC of its
method and the time under the cluster's peer secret, and the serving node checks it before any
handler runs. Pure code: no I/O, and no clock of its own (callers pass `now`).

Why an HMAC and not the secret itself: the secret never crosses the wire, so a header captured
from a port without TLS is worth one method for at most MAX_SKEW seconds, not the cluster's key
for good. Replays inside that window are possible without TLS (which is what mutual TLS adds).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

METADATA_KEY = "authorization"           # gRPC metadata keys are lower case
SCHEME = "cargohold-peer"
MAX_SKEW = 300.0                         # seconds a signature is accepted either side of the server's
                                         # clock: the clock skew allowed between nodes (as Kerberos)
SECRET_BYTES = 32
MAX_SECRETS = 2                          # the newest, and the one before it while a rotation spreads


@dataclass(frozen=True)
class PeerSecrets:
    """The cluster's peer secrets, newest first: calls are signed with the newest and accepted
    under any, so a call signed a moment before a rotation still passes."""
    secrets: tuple[bytes, ...]
    created: float

    @property
    def signing(self) -> bytes:
        return self.secrets[0]

    @classmethod
    def generate(cls, now: float) -> "PeerSecrets":
        return cls((secrets.token_bytes(SECRET_BYTES),), now)

    def rotated(self, now: float, *, drop_old: bool) -> "PeerSecrets":
        """A new signing secret; the current one stays accepted unless `drop_old` (a leaked secret)."""
        kept = () if drop_old else self.secrets[:MAX_SECRETS - 1]
        return PeerSecrets((secrets.token_bytes(SECRET_BYTES), *kept), now)

    def encode(self) -> bytes:
        return json.dumps({"secrets": [base64.b64encode(s).decode() for s in self.secrets],
                           "created": self.created}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "PeerSecrets":
        """Raises ValueError for anything but a stored document with at least one full-size secret."""
        try:
            document = json.loads(raw)
            found = tuple(base64.b64decode(s, validate=True) for s in document["secrets"])
            created = float(document.get("created", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise ValueError(f"malformed peer secrets: {exc}") from None
        if not found or any(len(s) < SECRET_BYTES for s in found):
            raise ValueError("malformed peer secrets: no secret, or one shorter than 32 bytes")
        return cls(found[:MAX_SECRETS], created)


def sign(secret: bytes, method: str, now: float) -> str:
    """The metadata value that authenticates one call of `method` (the full gRPC path)."""
    stamp = int(now)
    return f"{SCHEME} {stamp}.{_mac(secret, method, stamp)}"


def check(value: str | None, method: str, accepted: PeerSecrets, now: float) -> str | None:
    """None when `value` authenticates a call of `method` at `now`; otherwise why not (said to
    the caller in the status details, and logged)."""
    if value is None:
        return "no peer credential (every call between nodes must carry the cluster's credential)"
    scheme, _, token = value.partition(" ")
    stamp_text, _, mac = token.partition(".")
    if scheme != SCHEME or not (stamp_text.isascii() and stamp_text.isdigit()) or len(stamp_text) > 12:
        return "malformed peer credential"
    age = now - int(stamp_text)
    if abs(age) > MAX_SKEW:
        return (f"peer credential signed {age:+.0f} s from this node's clock: outside +-{MAX_SKEW:.0f} s "
                "(a replayed call, or clocks that differ too much)")
    given = mac.encode("utf-8", "replace")
    # Every accepted secret is tried (at most two), so the time taken says nothing about which matched.
    matches = [hmac.compare_digest(_mac(secret, method, int(stamp_text)).encode(), given)
               for secret in accepted.secrets]
    return None if any(matches) else "wrong peer credential (not signed with this cluster's peer secret)"


def _mac(secret: bytes, method: str, stamp: int) -> str:
    return hmac.new(secret, f"{method}\n{stamp}".encode(), hashlib.sha256).hexdigest()
