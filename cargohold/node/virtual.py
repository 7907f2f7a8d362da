"""Requests for a name inside a virtual repository (`dev/alpine`, issue 15): reads resolved over
the candidates in member order, pushes sent to the deployment target, access checked per member.

Which candidates a name has, and where pushes land, is decided in `repositories/virtual.py`
(pure); this module asks each candidate the way the node would for a direct request — a local
namespace the cluster's way, a remote member through the pull-through cache — and answers with
the first one that has the content (`X-Cargohold-Member` names it).

Cheap misses: by-digest reads first look through every candidate's storage in the read model
(no etcd call); by-tag reads take one read barrier for the whole request, after which a local
candidate's miss is answered by the read model. Only when the model does not have the content
is each candidate asked in turn with its ordinary (confirming, filling) read.

Access: the request's own check (`AccessControl.check`) covers the virtual name with the
client's token; each member is then checked against the access rules (a token names the
virtual repository the client asked for, never its members). A member the caller may not pull
is skipped, and audited as `denied` with `member`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from cargohold.coordinator.metadata import page   # the read model's paging
from cargohold.node.http import Request, Response
from cargohold.oci import errors
from cargohold.oci.reference import Digest, lookup_reference, parse_digest
from cargohold.repositories.routing import Route, route as route_of
from cargohold.repositories.virtual import (
    Candidate, VirtualRepository, candidates, deploy_target, owning_virtual,
)

if TYPE_CHECKING:
    from cargohold.node.api import RegistryAPI

MEMBER_HEADER = "X-Cargohold-Member"
WRITES = ("uploads", "upload")
RESOLUTIONS_REMEMBERED = 10_000


@dataclass(frozen=True)
class Source:
    """A candidate the caller may read: its storage name (`hub/library/alpine` for `hub/alpine`)
    and, for a remote member, the route of its cache."""
    candidate: Candidate
    storage: str
    route: Route | None = None


@dataclass(frozen=True)
class VirtualName:
    """A request's name inside a virtual repository, with what resolution needs."""
    name: str                       # `dev/alpine`
    virtual: VirtualRepository      # the virtual repository that owns it
    relative: str                   # `alpine`
    sources: tuple["Source", ...]   # the candidates that may be read, in order
    target: str | None              # `team-a/alpine`: where pushes land; None: no target


class Misses:
    """What the candidates said, for the answer when none had it: 503 if one failed, 403 if the
    caller may pull none that has it, else 404. Also asks `may_pull` once per source consulted
    (a denial is audited once, and only for members the resolution reached)."""

    def __init__(self, may_pull: Callable[["Source"], bool] = lambda source: True) -> None:
        self.failure: errors.RegistryError | None = None
        self.denied: list[str] = []
        self._may_pull = may_pull
        self._allowed: dict[str, bool] = {}

    def allowed(self, source: "Source") -> bool:
        name = source.candidate.name
        if name not in self._allowed:
            self._allowed[name] = self._may_pull(source)
            if not self._allowed[name]:
                self.denied.append(name)
        return self._allowed[name]

    def note(self, exc: errors.RegistryError) -> None:
        if exc.status == 404:
            return
        if exc.status >= 500:
            self.failure = self.failure or exc
            return
        raise exc          # a client error (a bad range, a method): the same from every member

    def answer(self, unknown: errors.RegistryError) -> errors.RegistryError:
        if self.failure is not None:
            return self.failure
        if self.denied:
            return errors.denied(f"not found in the members you may pull (denied: {', '.join(self.denied)})",
                                 detail=[{"Type": "repository", "Name": n, "Action": "pull"} for n in self.denied])
        return unknown


class VirtualRepositories:
    def __init__(self, api: "RegistryAPI"):
        self.api = api
        self.metadata = api.metadata
        # name -> its resolution (None: no virtual repository owns it), for every request with a
        # name: forgotten whenever a definition changes (section "repositories" of the watch)
        self._resolved: dict[str, VirtualName | None] = {}
        self.metadata.subscribe(self._definitions_changed)

    def _definitions_changed(self, _blobs: set, sections: set) -> None:
        if "repositories" in sections:
            self._resolved = {}

    # ------------------------------------------------------------------ resolution (no I/O)
    def resolve(self, name: str) -> VirtualName | None:
        """`name` as a name inside a virtual repository, or None when none owns it."""
        if not self.metadata.virtual_definitions():
            return None
        try:
            return self._resolved[name]
        except KeyError:
            pass
        if len(self._resolved) >= RESOLUTIONS_REMEMBERED:
            self._resolved = {}
        found = self._resolved[name] = self._resolution(name)
        return found

    def _resolution(self, name: str) -> VirtualName | None:
        virtuals = self.metadata.virtual_definitions()
        if name in virtuals:        # the virtual repository itself: answered after the access check
            return VirtualName(name, virtuals[name], "", (), None)
        owner = owning_virtual(virtuals, name)
        if owner is None:
            return None
        virtual, relative = owner
        remotes = self.metadata.repository_definitions()
        target = deploy_target(virtuals, remotes, virtual.name)
        return VirtualName(name, virtual, relative, self._sources(candidates(virtuals, remotes, name) or ()),
                           f"{target}/{relative}" if target else None)

    def _sources(self, found: list[Candidate]) -> tuple[Source, ...]:
        """The candidates in order, without the remote ones whose own globs exclude the name
        (never asked upstream), and all remote ones on a node that serves no remote repository."""
        remotes = self.metadata.repository_definitions()
        serves_remotes = self.api.pullthrough is not None
        sources = []
        for candidate in found:
            route = _remote_route(remotes, candidate)
            if route is None or (route.allowed and serves_remotes):
                sources.append(Source(candidate, route.local_name if route is not None else candidate.name, route))
        return tuple(sources)

    def _misses(self, request: Request, found: VirtualName) -> Misses:
        """A request's Misses, whose `allowed` checks the caller's pull on a source: on its own
        name and its storage name (the rules alone; audited with the member when denied)."""
        access = self.api.access
        if access is None:
            return Misses()

        def may_pull(source: Source) -> bool:
            for name in dict.fromkeys((source.candidate.name, source.storage)):
                if not access.member_may(request, name, "pull"):
                    access.audit_member_denial(request, found.name, name, "pull")
                    return False
            return True
        return Misses(may_pull)

    # ------------------------------------------------------------------ requests
    async def serve(self, request: Request, kind: str, params: dict, found: VirtualName) -> Response:
        if not found.relative:
            raise errors.name_unknown(f"{found.name} is a virtual repository, not an image in it",
                                      detail={"name": found.name})
        if request.method == "DELETE":
            where = f" (through {found.target})" if found.target else ""
            raise errors.denied(f"{found.virtual.name} is a virtual repository: delete in its member{where}",
                                detail={"name": found.name, "repository": found.virtual.name})
        if kind in WRITES or request.method in ("PUT", "POST", "PATCH"):
            return await self._push(request, kind, params, found)
        if kind == "manifest":
            return await self._manifest(request, found, params["reference"])
        if kind == "blob":
            return await self._blob(request, found, parse_digest(params["digest"]))
        if kind == "tags":
            return await self._tags(request, found)
        return await self._referrers(request, found, params["digest"])

    async def _manifest(self, request: Request, found: VirtualName, reference: str) -> Response:
        misses, sources = self._misses(request, found), found.sources
        tag, digest = lookup_reference(reference)
        if digest is not None:
            known = _first_known(sources, misses, lambda s: self.metadata.known_manifest(s.storage, str(digest)))
            if known is not None:
                response = await self.api._serve_manifest(request, known.storage, str(digest), reference)
                return _from(response, known)
        read_tag = await self.metadata.tag_reader() if tag is not None else None
        for source in sources:
            if not misses.allowed(source):
                continue
            try:
                if source.route is not None:
                    response = await self.api._remote_manifest(request, source.route, reference)
                else:
                    local = await read_tag(source.storage, tag) if read_tag is not None else str(digest)
                    if local is None:
                        continue
                    response = await self.api._serve_manifest(request, source.storage, local, reference)
            except errors.RegistryError as exc:
                misses.note(exc)
                continue
            return _from(response, source)
        raise misses.answer(errors.manifest_unknown(detail={"name": found.name, "reference": reference}))

    async def _blob(self, request: Request, found: VirtualName, digest: Digest) -> Response:
        _allow(request, "GET", "HEAD")
        misses, sources = self._misses(request, found), found.sources
        known = _first_known(sources, misses, lambda s: self.metadata.known_blob(s.storage, str(digest)))
        ordered = sources if known is None else (known, *(s for s in sources if s is not known))
        for source in ordered:
            if not misses.allowed(source):
                continue
            try:
                if source.route is not None and source is not known:
                    response = await self.api._remote_blob(request, source.route, digest)
                else:
                    response = await self.api._get_blob(request, source.storage, digest)
            except errors.RegistryError as exc:
                misses.note(exc)
                continue
            return _from(response, source)
        raise misses.answer(errors.blob_unknown(detail={"digest": str(digest)}))

    async def _tags(self, request: Request, found: VirtualName) -> Response:
        _allow(request, "GET")
        misses = self._misses(request, found)
        union: set[str] = set()
        any_found = False
        for source in found.sources:
            if not misses.allowed(source):
                continue
            try:
                tags = await self._tags_of(source)
            except errors.RegistryError as exc:
                misses.note(exc)
                continue
            if tags is not None:
                union.update(tags)
                any_found = True
        if not any_found:
            raise misses.answer(errors.name_unknown(detail={"name": found.name}))
        return self.api._tag_page(request, found.name, sorted(union))

    async def _tags_of(self, source: Source) -> list[str] | None:
        if source.route is not None:
            return await self.api.pullthrough.tags(source.route)
        listed = await self.metadata.tags(source.storage, None, None)
        return listed[0] if listed is not None else None

    async def _referrers(self, request: Request, found: VirtualName, digest: str) -> Response:
        """The referrers of every candidate the caller may pull (of a remote one: what is cached)."""
        misses = self._misses(request, found)
        readable = [source.storage for source in found.sources if misses.allowed(source)]
        return await self.api._referrers(request, found.name, digest, readable)

    # ------------------------------------------------------------------ pushes
    async def _push(self, request: Request, kind: str, params: dict, found: VirtualName) -> Response:
        if found.target is None:
            raise errors.denied(f"{found.virtual.name} is a virtual repository without a deployment target",
                                detail={"name": found.name, "repository": found.virtual.name})
        access = self.api.access
        if access is not None:
            access.require_member(request, found.name, found.target, "push", params.get("reference"))
        response = await self.api._handlers[kind](request, **{**params, "name": found.target})
        return _renamed(response, found.target, found.name)

    async def mount_source(self, request: Request, source: str, digest: Digest) -> str | None:
        """The repository a cross-repository mount `from=source` takes `digest` from: through
        the candidates when `source` is a virtual name (the first that holds it and the caller
        may pull); None when the caller may not pull it (then it is a plain upload)."""
        access = self.api.access
        if access is not None and not access.may(request, source, "pull"):
            return None
        found = self.resolve(source)
        if found is None:
            return source
        known = _first_known(found.sources, self._misses(request, found),
                             lambda s: self.metadata.known_blob(s.storage, str(digest)))
        return known.storage if known is not None else None

    # ------------------------------------------------------------------ catalog
    def catalog(self, n: int | None, last: str | None,
                visible: Callable[[str], bool] | None) -> tuple[list[str], bool]:
        """The catalog with, for every virtual repository, `dev/<image>` for each image one of
        its (local or cached) members holds and the caller may pull."""
        virtuals = self.metadata.virtual_definitions()
        if not virtuals:
            return self.metadata.catalog(n, last, visible)
        repos, _ = self.metadata.catalog(None, None, visible)
        names = set(repos) | set(virtual_images(virtuals, self.metadata.repository_definitions(), repos))
        if visible is not None:
            names = {name for name in names if visible(name)}
        return page(sorted(names), n, last)


def _first_known(sources: tuple[Source, ...], misses: Misses, known: Callable[[Source], object]) -> Source | None:
    """The first source the caller may pull whose storage the read model knows to hold the
    content (by digest: a model that lags can only miss it, never serve something else)."""
    return next((s for s in sources if known(s) is not None and misses.allowed(s)), None)


def _remote_route(remotes, candidate: Candidate) -> Route | None:
    """The cache route of a candidate served by a remote member, else None."""
    if not remotes:
        return None
    found = route_of(remotes, candidate.name)
    return found if found is not None and not found.unprefixed else None


def virtual_images(virtuals, remotes, repos: list[str]) -> list[str]:
    """`dev/<image>` for each repository in `repos` that resolving that name would read (pure)."""
    names = []
    for virtual in virtuals.values():
        for namespace in _leaf_members(virtuals, virtual, 0):
            for repo in repos:
                if not repo.startswith(namespace + "/"):
                    continue
                name = f"{virtual.name}/{repo[len(namespace) + 1:]}"
                if any(_storage(remotes, c) == repo for c in candidates(virtuals, remotes, name) or ()):
                    names.append(name)
    return names


def _leaf_members(virtuals, virtual: VirtualRepository, depth: int) -> set[str]:
    found = set()
    for member in virtual.members:
        if member.name in virtuals:
            if depth < 8:
                found |= _leaf_members(virtuals, virtuals[member.name], depth + 1)
        else:
            found.add(member.name)
    return found


def _storage(remotes, candidate: Candidate) -> str:
    route = _remote_route(remotes, candidate)
    return route.local_name if route is not None else candidate.name


def _allow(request: Request, *methods: str) -> None:
    if request.method not in methods:
        raise errors.unsupported(f"method {request.method} is not allowed here")


def _from(response: Response, source: Source) -> Response:
    return response.header(MEMBER_HEADER, source.candidate.name)


def _renamed(response: Response, target: str, name: str) -> Response:
    """The target's answer with its Location under the virtual name, so that the client goes on
    through it (the next chunk of an upload, the manifest it just pushed)."""
    prefix, renamed = f"/v2/{target}/".encode(), f"/v2/{name}/".encode()
    response.headers = [(key, renamed + value[len(prefix):] if key.lower() == b"location" and value.startswith(prefix)
                         else value) for key, value in response.headers]
    return response
