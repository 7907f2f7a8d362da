"""A virtual repository: one name over an ordered list of members (local namespaces, remote
repositories, other virtual repositories), read in order, pushed to one deployment target.

The record is stored at `repos/<name>` with `kind: virtual`. Pure: what a name resolves to is
computed here from the definitions; the node reads the candidates in order.

A member's include/exclude globs match the image's name *as that member knows it*: for a
remote member its upstream name (so `hub` limited to `library/**` serves `dev/alpine`, which
Docker Hub calls `library/alpine`), for a local namespace or a virtual member the name relative
to the member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from cargohold.oci.reference import validate_name
from cargohold.repositories.definitions import (
    InvalidDefinition, RemoteRepository, check_globs, glob_match, stored_document,
)

VIRTUAL = "virtual"
MAX_DEPTH = 8           # nesting deeper than this is refused (and never walked)


@dataclass(frozen=True)
class Member:
    name: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def admits(self, name_in_member: str) -> bool:
        if self.include and not any(glob_match(p, name_in_member) for p in self.include):
            return False
        return not any(glob_match(p, name_in_member) for p in self.exclude)

    def document(self) -> dict:
        return {"name": self.name, "include": list(self.include), "exclude": list(self.exclude)}


@dataclass(frozen=True)
class VirtualRepository:
    name: str
    members: tuple[Member, ...]
    deploy_to: str | None = None

    kind = VIRTUAL

    def __post_init__(self) -> None:
        for name in (self.name, *(m.name for m in self.members)):
            try:
                validate_name(name)
            except Exception:
                raise InvalidDefinition(f"{name!r} is not a valid repository name") from None
        if not self.members:
            raise InvalidDefinition("a virtual repository needs at least one member")
        for member in self.members:
            check_globs(member.include + member.exclude, f"member {member.name}")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise InvalidDefinition("a member is listed twice")
        if self.name in names:
            raise InvalidDefinition(f"{self.name} cannot be a member of itself")
        if self.deploy_to is not None and self.deploy_to not in names:
            raise InvalidDefinition(f"the deployment target {self.deploy_to} must be one of the members")

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def encode(self) -> bytes:
        return json.dumps({"kind": VIRTUAL, "members": [m.document() for m in self.members],
                           "deploy_to": self.deploy_to}, sort_keys=True).encode()

    @classmethod
    def decode(cls, name: str, document: dict) -> "VirtualRepository":
        members = tuple(Member(_string(m["name"]), _strings(m.get("include", ())), _strings(m.get("exclude", ())))
                        for m in document["members"])
        deploy_to = document.get("deploy_to")
        return cls(name, members, None if deploy_to is None else _string(deploy_to))

    def public(self) -> dict:
        return {"name": self.name, "kind": VIRTUAL, "members": [m.document() for m in self.members],
                "deploy_to": self.deploy_to}


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidDefinition(f"{value!r} is not a string")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidDefinition(f"{value!r} is not a list of globs")
    return tuple(_string(v) for v in value)


def _virtual_document(raw: bytes) -> dict | None:
    return stored_document(raw, VIRTUAL)


def is_virtual_record(raw: bytes) -> bool:
    """Whether `repos/<name>` holds a virtual repository's record (decodable or not): such a
    record never registers a local namespace, and `repo remove` still deletes it."""
    return _virtual_document(raw) is not None


def decode_virtual(name: str, raw: bytes) -> VirtualRepository | None:
    """The virtual repository stored at `repos/<name>`, or None for any other record (and for
    one that does not decode: one bad record must not stop every node's watch)."""
    document = _virtual_document(raw)
    if document is None:
        return None
    try:
        return VirtualRepository.decode(name, document)
    except (InvalidDefinition, KeyError, TypeError, ValueError, AttributeError):
        return None


def find_cycle(virtuals: Mapping[str, VirtualRepository]) -> list[str] | None:
    """A cycle of virtual repositories through their members (`a -> b -> a`), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done or name not in virtuals:
            return None
        for member in virtuals[name].members:
            found = visit(member.name, path + [name])
            if found:
                return found
        done.add(name)
        return None

    for name in sorted(virtuals):
        found = visit(name, [])
        if found:
            return found
    return None


def check_virtual(definition: VirtualRepository, virtuals: Mapping[str, VirtualRepository],
                  remotes: Mapping[str, RemoteRepository]) -> None:
    """Refuse a definition that would make a cycle, nest too deep, deploy into a cache or name a
    member inside another repository kind (its candidates would be routed twice)."""
    merged = {**virtuals, definition.name: definition}
    for member in definition.members:
        around = _definition_around(member.name, merged, remotes)
        if around is not None:
            kind, outer = around
            raise InvalidDefinition(f"member {member.name} is inside {kind} repository {outer}: name {outer} "
                                    "itself and restrict it with member globs")
    cycle = find_cycle(merged)
    if cycle:
        raise InvalidDefinition("virtual repositories would form a cycle: " + " -> ".join(cycle))
    if max(_depth(name, merged) for name in merged) > MAX_DEPTH:     # also what nests it counts
        raise InvalidDefinition(f"virtual repositories nest deeper than {MAX_DEPTH} levels")
    if definition.deploy_to is not None and deploy_target(merged, remotes, definition.name) is None:
        raise InvalidDefinition(f"{definition.deploy_to} cannot take pushes (a remote repository, "
                                "or a virtual one without a deployment target)")


def _definition_around(name: str, virtuals: Mapping[str, VirtualRepository],
                       remotes: Mapping[str, RemoteRepository]) -> tuple[str, str] | None:
    """(kind, name) of the definition `name` is nested inside, or None."""
    parts = name.split("/")
    for length in range(len(parts) - 1, 0, -1):
        prefix = "/".join(parts[:length])
        if prefix in virtuals:
            return VIRTUAL, prefix
        if prefix in remotes:
            return "remote", prefix
    return None


def _depth(name: str, virtuals: Mapping[str, VirtualRepository]) -> int:
    if name not in virtuals:
        return 0
    return 1 + max(_depth(m.name, virtuals) for m in virtuals[name].members)


@dataclass(frozen=True)
class Candidate:
    """One place a virtual name's image may be read from, in resolution order."""
    name: str                   # the repository to read: `team-a/alpine`, `hub/alpine`
    member: str                 # the member of the requested virtual repository it came through
    via: tuple[str, ...]        # the virtual repositories walked, outermost first


def owning_virtual(virtuals: Mapping[str, VirtualRepository], name: str) -> tuple[VirtualRepository, str] | None:
    """(the virtual repository `name` is inside of, the name relative to it), or None."""
    parts = name.split("/")
    for length in range(len(parts) - 1, 0, -1):
        found = virtuals.get("/".join(parts[:length]))
        if found is not None:
            return found, "/".join(parts[length:])
    return None


def candidates(virtuals: Mapping[str, VirtualRepository], remotes: Mapping[str, RemoteRepository],
               name: str) -> list[Candidate] | None:
    """Where to look for `name` (`dev/alpine`), in order; None when no virtual repository owns it."""
    owner = owning_virtual(virtuals, name)
    if owner is None:
        return None
    virtual, relative = owner
    found = _expand(virtuals, remotes, virtual, relative, (), 0)
    seen: set[str] = set()      # a repository reached through two nested members is read once
    return [c for c in found if not (c.name in seen or seen.add(c.name))]


def _expand(virtuals, remotes, virtual: VirtualRepository, relative: str, via: tuple[str, ...],
            depth: int) -> list[Candidate]:
    found: list[Candidate] = []
    if depth >= MAX_DEPTH:
        return found
    for member in virtual.members:
        if member.name in virtuals:
            if member.admits(relative):
                inner = _expand(virtuals, remotes, virtuals[member.name], relative, via + (virtual.name,), depth + 1)
                found += [Candidate(c.name, member.name if not via else c.member, c.via) for c in inner]
            continue
        remote = remotes.get(member.name)
        seen_as = remote.upstream_name(relative) if remote is not None else relative
        if member.admits(seen_as):
            found.append(Candidate(f"{member.name}/{relative}", member.name, via + (virtual.name,)))
    return found


def deploy_target(virtuals: Mapping[str, VirtualRepository], remotes: Mapping[str, RemoteRepository],
                  virtual_name: str, depth: int = 0) -> str | None:
    """The local namespace pushes to `virtual_name` land in, following nested targets; None when
    there is none (no target, or it ends at a remote repository)."""
    virtual = virtuals.get(virtual_name)
    if virtual is None or virtual.deploy_to is None or depth >= MAX_DEPTH:
        return None
    target = virtual.deploy_to
    if target in remotes:
        return None
    if target in virtuals:
        return deploy_target(virtuals, remotes, target, depth + 1)
    return target
