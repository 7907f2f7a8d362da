"""A remote repository: a namespace of this registry that caches another registry.

The record is a small JSON document stored at `repos/<name>` (DESIGN.md) with `kind: remote`;
local namespaces keep their `kind: local` registration there. The upstream password is part of
the stored record (every node needs it to fetch) but never of `public()`, `repr` or a message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from cargohold.oci.patterns import InvalidPattern, compile_glob
from cargohold.oci.reference import validate_name

REMOTE = "remote"
DEFAULT_TTL = 600.0                 # seconds a cached tag is served before it is revalidated
DEFAULT_OFFLINE_PERIOD = 30.0       # seconds an upstream that failed is assumed offline
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class InvalidDefinition(ValueError):
    """A repository definition that cannot be stored (the message says why)."""


def glob_match(pattern: str, name: str) -> bool:
    """`*` matches within one path segment, `**` across segments (`library/**`): the globs of
    access rules (`oci.patterns`)."""
    return compile_glob(pattern, path=True).fullmatch(name) is not None


def check_globs(patterns: tuple[str, ...], what: str) -> None:
    for pattern in patterns:
        try:
            compile_glob(pattern, path=True)
        except InvalidPattern:
            raise InvalidDefinition(f"{what}: {pattern!r} is not a repository glob") from None


def _seconds(value: object, what: str, *, minimum: float = 0.0) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidDefinition(f"{what} must be a number of seconds, not {value!r}") from None
    if seconds < minimum or seconds != seconds or seconds == float("inf"):
        raise InvalidDefinition(f"{what} must be at least {minimum:g} seconds")
    return seconds


def _host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


@dataclass(frozen=True)
class RemoteRepository:
    name: str                                   # the namespace: `hub` serves `hub/library/alpine`
    url: str                                    # the upstream registry, e.g. https://registry-1.docker.io
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ttl: float = DEFAULT_TTL
    include: tuple[str, ...] = ()               # upstream names it may serve (empty: all)
    exclude: tuple[str, ...] = ()               # upstream names it never asks for
    offline_period: float = DEFAULT_OFFLINE_PERIOD
    evict_unused_after: float | None = None     # seconds without a pull before release (None: never)
    mirror_for: tuple[str, ...] = ()            # extra registry hosts it answers `?ns=` requests for
    docker_mirror: bool = False                 # answers Docker's `registry-mirrors` (no `ns`) requests

    kind = REMOTE

    def __post_init__(self) -> None:
        try:
            validate_name(self.name)
        except Exception:
            raise InvalidDefinition(f"{self.name!r} is not a valid repository name") from None
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidDefinition(f"the upstream must be an http(s) URL, not {self.url!r}")
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise InvalidDefinition("the upstream URL is the registry's root (no path, query or fragment)")
        if parts.username or parts.password:
            raise InvalidDefinition("put upstream credentials in --username/--password-stdin, not in the URL")
        check_globs(self.include, "include")
        check_globs(self.exclude, "exclude")
        if self.password and not self.username:
            raise InvalidDefinition("a password needs a username")
        for what, value in (("ttl", self.ttl), ("offline period", self.offline_period)):
            _seconds(value, what)
        if self.evict_unused_after is not None:
            _seconds(self.evict_unused_after, "evict-unused-after", minimum=1.0)

    # -- what it serves
    @property
    def is_docker_hub(self) -> bool:
        return _host_of(self.url) in DOCKER_HUB_HOSTS

    def registries(self) -> frozenset[str]:
        """The registry hosts whose `?ns=` mirror requests this repository answers."""
        host = _host_of(self.url)
        port = urlsplit(self.url).port
        hosts = {host, f"{host}:{port}"} if port else {host}
        if host in DOCKER_HUB_HOSTS:
            hosts |= DOCKER_HUB_HOSTS
        return frozenset(hosts | {h.lower() for h in self.mirror_for})

    def upstream_name(self, name: str) -> str:
        """The upstream's name for `name` (relative to this namespace): Docker Hub's official
        images live under `library/`, so there `alpine` is `library/alpine`."""
        if self.is_docker_hub and "/" not in name:
            return f"library/{name}"
        return name

    def allows(self, upstream_name: str) -> bool:
        """Whether the include/exclude globs let this repository ask the upstream for it."""
        if self.include and not any(glob_match(p, upstream_name) for p in self.include):
            return False
        return not any(glob_match(p, upstream_name) for p in self.exclude)

    # -- records
    def encode(self) -> bytes:
        document = {"kind": REMOTE, "url": self.url, "ttl": self.ttl, "include": list(self.include),
                    "exclude": list(self.exclude), "offline_period": self.offline_period,
                    "evict_unused_after": self.evict_unused_after, "mirror_for": list(self.mirror_for),
                    "docker_mirror": self.docker_mirror}
        if self.username:
            document["username"] = self.username
            document["password"] = self.password or ""
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def decode(cls, name: str, raw: bytes | dict) -> "RemoteRepository":
        document = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        if document.get("kind") != REMOTE:
            raise InvalidDefinition(f"{name} is not a remote repository")
        return cls(name=name, url=document["url"], username=document.get("username"),
                   password=document.get("password"), ttl=document.get("ttl", DEFAULT_TTL),
                   include=tuple(document.get("include", ())), exclude=tuple(document.get("exclude", ())),
                   offline_period=document.get("offline_period", DEFAULT_OFFLINE_PERIOD),
                   evict_unused_after=document.get("evict_unused_after"),
                   mirror_for=tuple(document.get("mirror_for", ())),
                   docker_mirror=bool(document.get("docker_mirror", False)))

    def public(self) -> dict:
        """What `repo show`, `repo list` and any endpoint may show: never the password."""
        return {"name": self.name, "kind": REMOTE, "url": self.url, "ttl": self.ttl,
                "include": list(self.include), "exclude": list(self.exclude),
                "offline_period": self.offline_period, "evict_unused_after": self.evict_unused_after,
                "mirror_for": sorted(self.registries()), "docker_mirror": self.docker_mirror,
                "credentials": f"user {self.username}" if self.username else "anonymous"}

    def with_changes(self, **changes) -> "RemoteRepository":
        return replace(self, **changes)


def stored_document(raw: bytes, kind: str) -> dict | None:
    """The JSON document of a `repos/<name>` record of `kind` ("remote", "virtual"), or None."""
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    return document if isinstance(document, dict) and document.get("kind") == kind else None


def _remote_document(raw: bytes) -> dict | None:
    return stored_document(raw, REMOTE)


def is_remote_record(raw: bytes) -> bool:
    """Whether `repos/<name>` holds a remote repository's record (decodable or not)."""
    return _remote_document(raw) is not None


def decode_definition(name: str, raw: bytes) -> RemoteRepository | None:
    """The definition stored at `repos/<name>`, or None for a local namespace's registration
    and for a remote record that does not decode (written by hand or by a newer version): every
    node's watch applies these records, and one bad record must not stop them all. Such a record
    serves nothing; `repo remove` still deletes it (`is_remote_record`)."""
    document = _remote_document(raw)
    if document is None:
        return None
    try:
        return RemoteRepository.decode(name, document)
    except (InvalidDefinition, KeyError, TypeError, ValueError):
        return None
