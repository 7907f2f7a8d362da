"""Reading a pushed image back through a node, part by part, for the issue 13 tests.

`PushedImage` is what a test pushed and got its final 201 for. `read_every_part` asks a node
for every part of it (manifest by tag and by digest, GET and HEAD; every blob, GET and HEAD; the
tags list; the referrers list when the image has a subject) and returns one line per part the
node got wrong; `verify_bytes` checks the content alone (the manifest by tag and by digest, and
every blob, hash to their digests). Both return problems instead of raising, so a test can count them per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import anyio
import httpx

from tests.support import oci


STALE_TAG = "stale tag (the digest it had before this push)"


@dataclass(frozen=True)
class PushedImage:
    repo: str
    tag: str
    image: oci.Image
    subject: str | None = None        # the digest this manifest refers to (a referrer), if any

    @property
    def digest(self) -> str:
        return self.image.digest


async def push(client: httpx.AsyncClient, pushed: PushedImage) -> None:
    """Push blobs then the manifest under its tag; an exception or a non-201 means not acknowledged."""
    await oci.push_image(client, pushed.repo, pushed.tag, pushed.image)


def _problem(part: str, r: httpx.Response, why: str) -> str:
    return f"{part}: {why}: {oci.describe(r)}"


def _check_manifest(part: str, r: httpx.Response, pushed: PushedImage) -> str | None:
    if r.status_code != 200:
        return _problem(part, r, "status")
    if r.headers.get("docker-content-digest") != pushed.digest:
        moved = r.request.url.path.endswith(f"/manifests/{pushed.tag}")
        return _problem(part, r, STALE_TAG if moved else "digest header")
    if r.request.method == "HEAD":
        return None if int(r.headers.get("content-length", -1)) == pushed.image.size else _problem(part, r, "length")
    return None if r.content == pushed.image.manifest else _problem(part, r, "bytes")


def _check_blob(part: str, r: httpx.Response, digest: str, data: bytes) -> str | None:
    if r.status_code != 200:
        return _problem(part, r, "status")
    if r.request.method == "HEAD":
        return None if int(r.headers.get("content-length", -1)) == len(data) else _problem(part, r, "length")
    return None if oci.digest(r.content) == digest else _problem(part, r, "bytes do not hash to the digest")


def _check_tags(part: str, r: httpx.Response, pushed: PushedImage) -> str | None:
    if r.status_code != 200:
        return _problem(part, r, "status")
    return None if pushed.tag in (r.json().get("tags") or []) else _problem(part, r, f"tag {pushed.tag} missing")


def _check_referrers(part: str, r: httpx.Response, pushed: PushedImage) -> str | None:
    if r.status_code != 200:
        return _problem(part, r, "status")
    listed = {m.get("digest") for m in r.json().get("manifests", [])}
    return None if pushed.digest in listed else _problem(part, r, f"referrer {pushed.digest} missing")


def _requests(pushed: PushedImage):
    """(part, method, path, check) for every part of the image; `check(part, response)` gives
    a problem line or None."""
    base = f"/v2/{pushed.repo}"
    for ref in (pushed.tag, pushed.digest):
        for method in ("GET", "HEAD"):
            yield f"{method} manifest", method, f"{base}/manifests/{ref}", partial(_check_manifest, pushed=pushed)
    for digest, data in pushed.image.all_blobs().items():
        for method in ("GET", "HEAD"):
            yield f"{method} blob", method, f"{base}/blobs/{digest}", partial(_check_blob, digest=digest, data=data)
    yield "tags list", "GET", f"{base}/tags/list", partial(_check_tags, pushed=pushed)
    if pushed.subject is not None:
        yield "referrers", "GET", f"{base}/referrers/{pushed.subject}", partial(_check_referrers, pushed=pushed)


async def read_every_part(client: httpx.AsyncClient, pushed: PushedImage) -> list[str]:
    """Ask for every part at once (concurrently); one line per wrong answer or failed request."""
    problems: list[str] = []

    async def ask(part: str, method: str, path: str, check) -> None:
        try:
            r = await client.request(method, path, headers={"Accept": oci.ACCEPT_ALL})
        except httpx.HTTPError as exc:
            problems.append(f"{part} {path}: {exc!r}")
            return
        problem = check(part, r)
        if problem:
            problems.append(problem)

    async with anyio.create_task_group() as tg:
        for request in _requests(pushed):
            tg.start_soon(ask, *request)
    return problems


async def verify_bytes(client: httpx.AsyncClient, pushed: PushedImage) -> list[str]:
    """The manifest (by tag and by digest) and every blob, each hashing to its digest; one line
    per problem."""
    problems = []
    base = f"/v2/{pushed.repo}"
    for ref in (pushed.tag, pushed.digest):
        r = await client.get(f"{base}/manifests/{ref}", headers={"Accept": oci.ACCEPT_ALL})
        if r.status_code != 200 or oci.digest(r.content) != pushed.digest:
            problems.append(_problem(f"manifest {ref}", r, "not the acknowledged bytes"))
    for digest in pushed.image.all_blobs():
        r = await client.get(f"{base}/blobs/{digest}")
        if r.status_code != 200 or oci.digest(r.content) != digest:
            problems.append(_problem(f"blob {digest}", r, "not the acknowledged bytes"))
    return problems
