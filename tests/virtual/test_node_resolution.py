"""The pure parts of the node's virtual repositories (no I/O): catalog names, Location
rewriting, and the answer when no candidate had the content."""

from __future__ import annotations

import pytest

from cargohold.node.http import Response
from cargohold.node.virtual import Misses, _renamed, virtual_images
from cargohold.oci import errors
from cargohold.repositories.definitions import RemoteRepository
from cargohold.repositories.virtual import Member, VirtualRepository

HUB = RemoteRepository(name="hub", url="https://registry-1.docker.io")
REMOTES = {"hub": HUB}


def test_node_catalog_names_of_local_and_cached_members():
    dev = VirtualRepository("dev", (Member("team-a"), Member("hub", include=("library/**",))), "team-a")
    repos = ["team-a/app", "hub/library/alpine", "hub/someone/tool", "other/thing"]
    assert sorted(virtual_images({"dev": dev}, REMOTES, repos)) == ["dev/app", "dev/library/alpine"]


def test_node_catalog_names_through_a_nested_virtual():
    inner = VirtualRepository("inner", (Member("team-b"),), "team-b")
    outer = VirtualRepository("outer", (Member("team-a"), Member("inner")), "inner")
    names = virtual_images({"inner": inner, "outer": outer}, {}, ["team-b/app", "team-a/tool"])
    assert sorted(names) == ["inner/app", "outer/app", "outer/tool"]


def test_node_location_renamed_under_the_virtual_name():
    response = Response(202).header("Location", "/v2/team-a/app/blobs/uploads/abc").header("Range", "0-9")
    renamed = _renamed(response, "team-a/app", "dev/app")
    assert dict(renamed.headers)[b"Location"] == b"/v2/dev/app/blobs/uploads/abc"
    assert dict(renamed.headers)[b"Range"] == b"0-9"


def test_node_misses_answer_unknown_denied_or_unavailable():
    unknown = errors.manifest_unknown()
    misses = Misses()
    misses.note(errors.manifest_unknown())
    assert misses.answer(unknown) is unknown
    misses.denied.append("secret/app")
    assert misses.answer(unknown).code == "DENIED"
    down = errors.unavailable("upstream down")
    misses.note(down)
    assert misses.answer(unknown) is down


def test_node_misses_client_error_is_not_skipped():
    with pytest.raises(errors.RegistryError):
        Misses().note(errors.unsupported("bad range", status=416))
