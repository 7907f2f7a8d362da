"""Registry-client protocol rules with no I/O (h11 style): `WWW-Authenticate` challenges, token
scopes and their cache, Docker Hub's naming rule, `Link` pagination, `Retry-After`, and which
HTTP status means which failure. The client in `client.py` only moves bytes around these."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import urljoin

from cargohold.upstream import errors

# Docker Hub answers under several names; only there does `alpine` mean `library/alpine`.
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# The Docker token spec: a token response without `expires_in` is good for 60 seconds.
DEFAULT_TOKEN_LIFETIME = 60.0
# Renew this long before expiry (at most a tenth of the lifetime) so a token never dies in flight.
TOKEN_RENEWAL_MARGIN = 10.0

_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')
_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: `scheme` in lower case ("bearer", "basic")."""
    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str | None) -> Challenge | None:
    """`Bearer realm="...",service="...",scope="repository:a:pull,push"` -> Challenge.
    Quoted values may hold commas (scopes do). None for a missing or empty header."""
    if not header or not header.strip():
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        name, quoted, bare = match.groups()
        params[name.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
    return Challenge(scheme.lower(), params)


def repository_scope(repository: str, actions: str = "pull") -> str:
    return f"repository:{repository}:{actions}"


def token_query(challenge: Challenge, scope: str) -> dict[str, str]:
    """The query of the GET to the realm: the challenge's service and our scope (the challenge's
    scope is the one of the request that got the 401, and a cached challenge serves other repositories)."""
    query = {"scope": scope}
    if "service" in challenge.params:
        query["service"] = challenge.params["service"]
    return query


def token_from_response(document: object) -> tuple[str, float]:
    """(token, lifetime in seconds) from a token endpoint's JSON body; `token` or `access_token`."""
    if not isinstance(document, dict):
        raise errors.UpstreamDenied("token endpoint answered without a JSON object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token:
        raise errors.UpstreamDenied("token endpoint answered without a token")
    lifetime = document.get("expires_in")
    if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return token, float(lifetime)


class TokenCache:
    """Bearer tokens per scope until shortly before they expire. The clock is injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}    # scope -> (token, renew at)

    def get(self, scope: str) -> str | None:
        entry = self._tokens.get(scope)
        if entry is None or self._clock() >= entry[1]:
            return None
        return entry[0]

    def put(self, scope: str, token: str, lifetime: float, obtained_at: float) -> None:
        """`obtained_at` is the clock before the token was asked for, so the lifetime is not overestimated."""
        margin = min(TOKEN_RENEWAL_MARGIN, lifetime / 10)
        now = self._clock()
        self._tokens = {s: entry for s, entry in self._tokens.items() if entry[1] > now}   # drop the dead
        self._tokens[scope] = (token, obtained_at + lifetime - margin)

    def forget(self, scope: str) -> None:
        self._tokens.pop(scope, None)

    def __repr__(self) -> str:
        return f"TokenCache({len(self._tokens)} scopes)"


def upstream_repository(host: str, repository: str) -> str:
    """The name the upstream knows: Docker Hub's official images live under `library/`."""
    if host.lower() in DOCKER_HUB_HOSTS and "/" not in repository:
        return f"library/{repository}"
    return repository


def next_page(link_header: str | None, current_url: str) -> str | None:
    """The absolute URL of the `rel="next"` page of a `Link` header, or None."""
    if not link_header:
        return None
    match = _LINK_NEXT.search(link_header)
    return urljoin(current_url, match.group(1)) if match else None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def failure_for_status(status: int, what: str, retry_after: str | None = None) -> errors.UpstreamError | None:
    """The error an answer's status means (None for success); `what` says what was asked, for messages."""
    if status < 400:
        return None
    if status == 404:
        return errors.UpstreamNotFound(f"{what}: not found upstream")
    if status in (401, 403):
        return errors.UpstreamDenied(f"{what}: upstream answered {status}")
    if status == 429:
        seconds = retry_after_seconds(retry_after)
        return errors.UpstreamRateLimited(f"{what}: rate limited (429)", seconds)
    if status >= 500:
        return errors.UpstreamUnavailable(f"{what}: upstream answered {status}", status)
    return errors.UpstreamError(f"{what}: upstream answered {status}")
