"""Bearer tokens, no I/O: the claims of an HS256 JWT, encoding and verifying it, and reading
its `access` claim. The signing keys live in etcd (coordinator/accounts.py `SigningKey`); this
module needs only a key's id and secret, so it takes anything shaped like `TokenKey`."""

from __future__ import annotations

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
    pass


def token_claims(subject: Subject, access: list[dict], service: str, ttl: float, now: float) -> dict:
    return {"iss": service, "sub": subject.login, "aud": service, "iat": int(now), "nbf": int(now) - 1,
            "exp": int(now + ttl), "jti": secrets.token_hex(12), "access": access}


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
            raise TokenError("token signed with an unknown key")
        claims = jwt.decode(token, key.secret, algorithms=["HS256"], audience=service, issuer=service,
                            leeway=TOKEN_LEEWAY, options={"require": ["exp", "iat", "aud", "iss", "sub"]})
    except jwt.PyJWTError as exc:
        raise TokenError(str(exc)) from None
    if not isinstance(claims.get("access", []), list):
        raise TokenError("malformed access claim")
    return claims


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
