"""Bearer tokens, no I/O: the claims of an HS256 JWT, encoding and verifying it, and reading
its `access` claim. The signing keys live in etcd (coordinator/accounts.py `SigningKey`); this
module needs only a key's id and secret, so it takes anything shaped like `TokenKey`."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Callable, Protocol

import jwt

from cargohold.auth.subjects import Subject

TOKEN_LEEWAY = 5.0                             # seconds of clock skew tolerated between nodes


class TokenKey(Protocol):
    """A token signing key: `kid` in the JWT header, and the HMAC secret."""
    @property
    def key_id(self) -> str: ...

    @property
    def secret(self) -> bytes: ...


class TokenError(ValueError):
    """A token that must be refused. `reason` is one of a few fixed words (expired, signature,
    unknown key, audience, malformed), for the audit log: the message may quote the token."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


# The `cst` claim: a digest of the account's password hash when the token was issued. A token
# whose account has since changed its password (or been removed and re-created) no longer
# matches, and is refused at once. The bcrypt hash holds a random 128-bit salt, so this short
# digest tells the token's holder nothing about the password.
STAMP_CLAIM = "cst"


def credential_stamp(password_hash: str) -> str:
    digest = hashlib.blake2b(password_hash.encode(), digest_size=12, person=b"cargohold-cst").digest()
    return base64.urlsafe_b64encode(digest).decode()


def token_claims(subject: Subject, access: list[dict], service: str, ttl: float, now: float,
                 stamp: str = "") -> dict:
    """The claims of a token for `subject`; `stamp` is `credential_stamp` of its password hash
    (none for anonymous)."""
    claims = {"iss": service, "sub": subject.login, "aud": service, "iat": int(now), "nbf": int(now) - 1,
              "exp": int(now + ttl), "jti": secrets.token_hex(12), "access": access}
    if stamp:
        claims[STAMP_CLAIM] = stamp
    return claims


def encode_token(claims: dict, key: TokenKey) -> str:
    return jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.key_id})


def token_key_id(token: str) -> str:
    """The `kid` of a token whose signature was already verified."""
    return str(jwt.get_unverified_header(token)["kid"])


def decode_token(token: str, key_for: Callable[[str], TokenKey | None], service: str) -> dict:
    """Verify signature, expiry, audience and issuer; TokenError otherwise."""
    try:
        header = jwt.get_unverified_header(token)
        key = key_for(str(header.get("kid", "")))
        if key is None or header.get("alg") != "HS256":
            raise TokenError("token signed with an unknown key", "unknown key")
        claims = jwt.decode(token, key.secret, algorithms=["HS256"], audience=service, issuer=service,
                            leeway=TOKEN_LEEWAY, options={"require": ["exp", "iat", "aud", "iss", "sub"]})
    except jwt.PyJWTError as exc:
        raise TokenError(str(exc), _refusal_reason(exc)) from None
    if not isinstance(claims.get("access", []), list):
        raise TokenError("malformed access claim")
    return claims


def _refusal_reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "signature"
    if isinstance(exc, (jwt.InvalidAudienceError, jwt.InvalidIssuerError)):
        return "audience"
    return "malformed"


def access_map(claims: dict) -> dict[tuple[str, str], frozenset]:
    """The `access` claim as {(type, name): actions}."""
    found: dict[tuple[str, str], frozenset] = {}
    for entry in claims.get("access", []):
        if isinstance(entry, dict) and isinstance(entry.get("actions"), list):
            key = (str(entry.get("type")), str(entry.get("name")))
            found[key] = found.get(key, frozenset()) | frozenset(str(a) for a in entry["actions"])
    return found


def token_allows(grants: dict, repo: str, action: str) -> bool:
    """Does an `access_map` grant `action` on repository `repo`?"""
    actions = grants.get(("repository", repo))
    return actions is not None and (action in actions or "*" in actions)
