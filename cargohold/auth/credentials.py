"""The HTTP side of authentication, no I/O: parsing an `Authorization` header (Basic or
Bearer) and building the `WWW-Authenticate` Bearer challenge of the Docker token flow."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Credentials:
    scheme: str                        # "basic" or "bearer"
    username: str = ""
    password: str = ""
    token: str = ""


_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")


def parse_authorization(header: str) -> Credentials:
    """An `Authorization` header; raises ValueError when it is not usable Basic or Bearer."""
    scheme, _, rest = header.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer":
        if not rest or len(rest) > MAX_TOKEN_LENGTH or not _TOKEN_CHARS.fullmatch(rest):
            raise ValueError("malformed bearer token")
        return Credentials("bearer", token=rest)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise ValueError("malformed basic credentials") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username or len(username) > 128 or len(password) > 1024:
            raise ValueError("malformed basic credentials")
        return Credentials("basic", username=username, password=password)
    raise ValueError("unsupported authorization scheme")


def _quoted(value: str) -> str:
    """A quoted-string for a challenge, with anything that could break out of it removed."""
    return '"' + "".join(c for c in value if c.isprintable() and c not in '"\\') + '"'


def challenge(realm: str, service: str, scope: str | None = None, error: str | None = None) -> str:
    """`Bearer realm="...",service="..."[,scope="..."][,error="..."]`; several scopes in `scope`
    are separated by spaces (as Distribution sends them)."""
    parts = [f"Bearer realm={_quoted(realm)}", f"service={_quoted(service)}"]
    if scope:
        parts.append(f"scope={_quoted(scope)}")
    if error:
        parts.append(f"error={_quoted(error)}")
    return ",".join(parts)
