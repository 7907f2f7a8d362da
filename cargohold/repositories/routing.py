"""Which remote repository, if any, serves a request's repository name. Pure.

Three ways in:
- the namespace: `hub/library/alpine` (and, for Docker Hub, `hub/alpine`) is served by the
  remote repository `hub`;
- a registry mirror request (containerd's `hosts.toml` adds `?ns=docker.io`): `library/alpine`
  with `ns=docker.io` is served by the remote repository whose upstream is that registry;
- Docker's `registry-mirrors` (no `ns`): a name no namespace claims is served by the one remote
  repository declared `docker_mirror`, for reads only.

Cached content is stored under the canonical local name `<repository>/<upstream name>`, so
`hub/alpine` and `hub/library/alpine` share one cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cargohold.repositories.definitions import RemoteRepository


@dataclass(frozen=True)
class Route:
    repository: RemoteRepository
    upstream_name: str          # the upstream's name: `library/alpine`
    local_name: str             # where the cache stores it: `hub/library/alpine`
    allowed: bool               # the include/exclude globs let it be asked of the upstream
    unprefixed: bool = False    # found as Docker's default mirror: a local repository of this
                                # name, if one exists, wins (the caller checks)


def _route(repository: RemoteRepository, relative: str, unprefixed: bool = False) -> Route:
    upstream = repository.upstream_name(relative)
    return Route(repository, upstream, f"{repository.name}/{upstream}", repository.allows(upstream), unprefixed)


def owning_namespace(definitions: Mapping[str, RemoteRepository], name: str) -> RemoteRepository | None:
    """The defined repository `name` is inside of (`hub` for `hub/x/y`), or None."""
    parts = name.split("/")
    for length in range(len(parts) - 1, 0, -1):
        found = definitions.get("/".join(parts[:length]))
        if found is not None:
            return found
    return None


def route(definitions: Mapping[str, RemoteRepository], name: str, ns: str | None = None,
          *, read: bool = True) -> Route | None:
    """The route for repository `name` of a request, or None when a local namespace serves it."""
    if ns:
        wanted = ns.lower()
        for repository in sorted(definitions.values(), key=lambda r: r.name):
            if wanted in repository.registries():
                return _route(repository, name)
    if name in definitions:       # the namespace itself holds nothing (and is never a local repo)
        repository = definitions[name]
        return Route(repository, "", name, allowed=False)
    owner = owning_namespace(definitions, name)
    if owner is not None:
        return _route(owner, name[len(owner.name) + 1:])
    if read and not ns:
        mirrors = [r for r in definitions.values() if r.docker_mirror]
        if len(mirrors) == 1:
            return _route(mirrors[0], name, unprefixed=True)
    return None
