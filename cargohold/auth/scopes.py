"""Token scopes and what a request needs, no I/O: parsing the Docker token spec's
`repository:<name>:<actions>` scopes, and `required()`, which maps a route and method to the
`Need` a request must satisfy (and the scope its 401 challenge asks for)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from cargohold.oci.reference import MAX_NAME_LENGTH, NAME_RE

REPO_ACTIONS = ("pull", "push", "delete")
REGISTRY_RESOURCES = ("catalog", "admin")      # registry:catalog:*, registry:admin:*
MAX_SCOPE_LENGTH = 512


class ScopeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Scope:
    type: str                 # "repository" or "registry"
    name: str
    actions: tuple[str, ...]  # known actions only; "*" means all

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


_SCOPE_TYPE = re.compile(r"(repository|registry)(?:\([a-z0-9]{1,32}\))?")
_ACTION_WORD = re.compile(r"[a-z*][a-z-]{0,31}|\*")


def parse_scope(text: str) -> Scope:
    """`repository:library/alpine:pull,push` (the Docker token spec's scope). Unknown but
    well-formed actions are dropped (they grant nothing); anything malformed is a ScopeError."""
    if len(text) > MAX_SCOPE_LENGTH:
        raise ScopeError("scope too long")
    kind, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2:
        raise ScopeError(f"malformed scope {text[:80]!r}")
    match = _SCOPE_TYPE.fullmatch(kind)
    if not match:
        raise ScopeError(f"unknown resource type in scope {text[:80]!r}")
    kind = match.group(1)
    if kind == "repository" and not _valid_name(name):
        raise ScopeError(f"invalid repository name in scope {text[:80]!r}")
    if kind == "registry" and name not in REGISTRY_RESOURCES:
        raise ScopeError(f"unknown registry resource in scope {text[:80]!r}")
    words = actions.split(",") if actions else []
    if any(not _ACTION_WORD.fullmatch(w) for w in words):
        raise ScopeError(f"malformed actions in scope {text[:80]!r}")
    known = REPO_ACTIONS + ("*",) if kind == "repository" else ("*",)
    return Scope(kind, name, tuple(dict.fromkeys(w for w in words if w in known)))


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Every `scope` parameter; each may hold several scopes separated by spaces (OAuth2)."""
    return [parse_scope(part) for value in values for part in value.split(" ") if part]


def _valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs: 'login' (any valid credentials), 'catalog', 'admin', or an action on
    a repository. `mount_from` is the source of a cross-repository mount: the request does not
    need pull there (without it the mount is a plain upload), but its challenge asks for it."""
    what: str
    repo: str = ""
    mount_from: str = ""

    @property
    def scope(self) -> str | None:
        """The challenge's `scope`: several scopes are separated by spaces, as Distribution does."""
        if self.what == "login":
            return None
        if self.what in REGISTRY_RESOURCES:
            return f"registry:{self.what}:*"
        scope = f"repository:{self.repo}:{_CHALLENGE_ACTIONS[self.what]}"
        if self.mount_from:
            scope += f" repository:{self.mount_from}:pull"
        return scope


# A pusher also reads (docker HEADs blobs before pushing them), so its challenge asks for both.
_CHALLENGE_ACTIONS = {"pull": "pull", "push": "pull,push", "delete": "delete"}


def required(method: str, kind: str, path: str, params: dict,
             query: Callable[[str], str | None] | None = None) -> Need | None:
    """What the request needs, from its route and method; None for open service routes.
    `query(name)` reads a query parameter: only a mount (`POST .../blobs/uploads/?mount=&from=`)
    looks at it."""
    if kind == "service":
        return Need("admin") if path == "/admin" or path.startswith("/admin/") else None
    if kind == "base":
        return Need("login")
    if kind == "catalog":
        return Need("catalog")
    name = params.get("name", "")
    if method in ("GET", "HEAD") and kind != "upload":
        return Need("pull", name)
    if method == "DELETE" and kind in ("manifest", "blob"):
        return Need("delete", name)
    if kind == "uploads" and method == "POST" and query is not None:
        return Need("push", name, _mount_source(name, query))
    return Need("push", name)


def _mount_source(name: str, query: Callable[[str], str | None]) -> str:
    """The `from` of a cross-repository mount, when it is one and names another valid repository."""
    source = query("from")
    if query("mount") is None or source is None or source == name or not _valid_name(source):
        return ""
    return source
