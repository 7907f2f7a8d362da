"""Content discovery: tags list and ``_catalog``, with ``n``/``last`` pagination and ``Link``.

Spec (distribution-spec v1.1): tags "MUST be sorted in lexical (case-insensitive
alphanumeric) or ASCIIbetical order"; with ``n`` "in every other situation, it must
return exactly <int> tags"; "If n=0, the registry must return an empty list and must not
include a Link header"; ``last``: "returns up to <int> tags that appear after <tagname>",
not including it; the next page is announced by an RFC 5988 ``Link: <url>; rel="next"``.
All tags here are lower case so that both allowed orders coincide.
"""

from __future__ import annotations

import random
import re
import uuid

import httpx
import pytest

from tests.support.oci import build_image, describe, error_codes, push_image, push_manifest

pytestmark = pytest.mark.anyio

LINK_RE = re.compile(r'^\s*<([^>]+)>\s*;\s*rel="?next"?\s*$')

TAGS = ["1.0", "1.10", "1.9", "a", "a-b", "a.b", "a_b", "b", "latest", "v1", "v10", "v2"]


def parse_next_link(r: httpx.Response) -> httpx.URL | None:
    link = r.headers.get("Link")
    if link is None:
        return None
    m = LINK_RE.match(link)
    assert m, f"Link header not in RFC 5988 next form: {link!r}"
    return httpx.URL(m.group(1))


async def tag_all(client, repo: str, tags: list[str]) -> None:
    image = build_image(f"tags-{repo}", layers=1)
    await push_image(client, repo, tags[0], image)
    for t in tags[1:]:
        r = await push_manifest(client, repo, t, image.manifest, image.media_type)
        assert r.status_code == 201, describe(r)


async def tags_page(client, repo: str, **params) -> httpx.Response:
    r = await client.get(f"/v2/{repo}/tags/list", params=params)
    assert r.status_code == 200, describe(r)
    assert r.headers.get("Content-Type", "").split(";")[0] == "application/json", describe(r)
    body = r.json()
    assert body["name"] == repo, describe(r)
    assert isinstance(body["tags"], list), describe(r)
    return r


# -- tags ----------------------------------------------------------------------------------------
async def test_tags_list_is_lexically_sorted(client, repo):
    shuffled = TAGS[:]
    random.Random(7).shuffle(shuffled)
    await tag_all(client, repo, shuffled)
    r = await tags_page(client, repo)
    assert r.json()["tags"] == sorted(TAGS), describe(r)
    assert r.headers.get("Link") is None, describe(r)


async def test_tags_pagination_follows_link(client, repo):
    await tag_all(client, repo, TAGS)
    expected = sorted(TAGS)
    r = await tags_page(client, repo, n=5)
    pages = [r.json()["tags"]]
    assert pages[0] == expected[:5], describe(r)
    link = parse_next_link(r)
    assert link is not None, "first page of 5 out of 12 must announce the next page"
    assert link.path == f"/v2/{repo}/tags/list", link
    assert link.params.get("n") == "5", link
    assert link.params.get("last") == expected[4], link
    seen = 1
    while link is not None:
        seen += 1
        assert seen < 10, "pagination does not end"
        r = await client.get(str(link))
        assert r.status_code == 200, describe(r)
        pages.append(r.json()["tags"])
        link = parse_next_link(r)
    assert pages[1] == expected[5:10]
    flat = [t for p in pages for t in p]
    assert flat == expected  # every tag once, in order
    assert all(len(p) <= 5 for p in pages)


@pytest.mark.parametrize("n", [1, 3, 4, 11, 12])
async def test_tags_pages_have_exactly_n(client, repo, n):
    await tag_all(client, repo, TAGS)
    expected = sorted(TAGS)
    last = None
    got: list[str] = []
    for _ in range(20):
        params = {"n": n} if last is None else {"n": n, "last": last}
        r = await tags_page(client, repo, **params)
        page = r.json()["tags"]
        remaining = len(expected) - len(got)
        # "must return exactly <int> tags" unless fewer remain
        assert len(page) == min(n, remaining), describe(r)
        got += page
        if len(got) == len(expected):
            break
        assert parse_next_link(r) is not None, describe(r)
        last = page[-1]
    assert got == expected


async def test_tags_n_larger_than_count_has_no_link(client, repo):
    await tag_all(client, repo, TAGS)
    r = await tags_page(client, repo, n=100)
    assert r.json()["tags"] == sorted(TAGS)
    assert r.headers.get("Link") is None, describe(r)


async def test_tags_n_zero_is_empty_without_link(client, repo):
    await tag_all(client, repo, TAGS)
    r = await tags_page(client, repo, n=0)
    assert r.json()["tags"] == [], describe(r)
    assert r.headers.get("Link") is None, describe(r)


async def test_tags_last_without_n(client, repo):
    await tag_all(client, repo, TAGS)
    r = await tags_page(client, repo, last="a_b")
    assert r.json()["tags"] == [t for t in sorted(TAGS) if t > "a_b"], describe(r)


async def test_tags_last_between_existing_tags(client, repo):
    await tag_all(client, repo, TAGS)
    r = await tags_page(client, repo, n=2, last="c")  # "c" is not a tag
    assert r.json()["tags"] == ["latest", "v1"], describe(r)
    r = await tags_page(client, repo, last="zzz")
    assert r.json()["tags"] == [], describe(r)
    assert r.headers.get("Link") is None, describe(r)


async def test_tags_list_unknown_repo_is_404_name_unknown(client, repo):
    r = await client.get(f"/v2/{repo}/tags/list")
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["NAME_UNKNOWN"], describe(r)


async def test_tags_list_sees_new_tag_immediately(client, repo):
    await tag_all(client, repo, ["one"])
    await tag_all(client, repo, ["two"])
    r = await tags_page(client, repo)
    assert r.json()["tags"] == ["one", "two"], describe(r)


# -- catalog -------------------------------------------------------------------------------------
async def catalog_all(client, n: int | None = None) -> tuple[list[str], list[list[str]]]:
    params = {"n": n} if n is not None else {}
    r = await client.get("/v2/_catalog", params=params)
    assert r.status_code == 200, describe(r)
    pages = [r.json()["repositories"]]
    link = parse_next_link(r)
    guard = 0
    while link is not None:
        guard += 1
        assert guard < 1000, "catalog pagination does not end"
        assert link.path == "/v2/_catalog", link
        if n is not None:
            assert link.params.get("n") == str(n), link
        assert link.params.get("last") == pages[-1][-1], link
        r = await client.get(str(link))
        assert r.status_code == 200, describe(r)
        pages.append(r.json()["repositories"])
        link = parse_next_link(r)
    return [x for p in pages for x in p], pages


async def test_catalog_lists_repositories_sorted_and_paginated(client):
    prefix = f"cat{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}/b", f"{prefix}/a", f"{prefix}/a/nested", f"{prefix}-z", f"{prefix}/c.d"]
    image = build_image("catalog", layers=1)
    for name in names:
        await push_image(client, name, "v1", image)

    everything, pages = await catalog_all(client)
    assert everything == sorted(everything), everything
    assert len(set(everything)) == len(everything)
    mine = [x for x in everything if x.startswith(prefix)]
    assert mine == sorted(names), everything

    paged, pages = await catalog_all(client, n=2)
    assert paged == everything
    assert all(len(p) == 2 for p in pages[:-1]), pages
    assert 1 <= len(pages[-1]) <= 2, pages


async def test_catalog_n_zero_and_last(client):
    prefix = f"cat{uuid.uuid4().hex[:6]}"
    image = build_image("catalog-last", layers=1)
    for name in (f"{prefix}/x", f"{prefix}/y"):
        await push_image(client, name, "v1", image)
    r = await client.get("/v2/_catalog", params={"n": 0})
    assert r.status_code == 200, describe(r)
    assert r.json()["repositories"] == [], describe(r)
    assert r.headers.get("Link") is None, describe(r)
    r = await client.get("/v2/_catalog", params={"n": 1, "last": f"{prefix}/x"})
    assert r.status_code == 200, describe(r)
    assert r.json()["repositories"] == [f"{prefix}/y"], describe(r)
