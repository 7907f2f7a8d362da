import pytest

from cargohold.coordinator.keys import Keys
from cargohold.coordinator.readmodel import ReadModel, page
from cargohold.coordinator.records import BlobRecord, ManifestRecord

K = Keys("c1")
D = "sha256:" + "a" * 64
S = "sha256:" + "b" * 64


def record(subject=None):
    return ManifestRecord("application/vnd.oci.image.manifest.v1+json", 10, (S,), (), subject, "x/y", 1.0)


def test_keys_parse_back_with_nested_repository_names():
    assert K.parse(K.tag("a/b/c", "v1")).repo == "a/b/c"
    assert K.parse(K.manifest("a/b", D)).digest == D
    parsed = K.parse(K.blob_in(D, "lib/ubuntu"))
    assert (parsed.kind, parsed.digest, parsed.repo) == ("blob_in", D, "lib/ubuntu")
    assert K.parse(K.blob_at(D, "n1")).name == "n1"
    assert K.parse(K.blob(D)).kind == "blob"
    assert K.parse("/cargohold/other/tags/a/b").kind == "other"


def test_apply_tags_manifests_blobs_and_deletes():
    m = ReadModel(K)
    m.apply_put(K.repo("a/b"), b'{"kind":"local"}')
    m.apply_put(K.tag("a/b", "v2"), D.encode())
    m.apply_put(K.tag("a/b", "v1"), D.encode())
    m.apply_put(K.tag("a", "x"), D.encode())          # repo "a" is distinct from "a/b"
    m.apply_put(K.manifest("a/b", D), record(subject=S).encode())
    m.apply_put(K.blob(S), BlobRecord(5, 1.0).encode())
    m.apply_put(K.blob_in(S, "a/b"), b"")
    assert m.repo("a/b").sorted_tags() == ["v1", "v2"]
    assert m.sorted_repos() == ["a/b"]
    assert m.blob_in_repo(S, "a/b").record.size == 5 and m.blob_in_repo(S, "a") is None
    assert m.referrers[("a/b", S)] == {D}
    m.apply_delete(K.tag("a/b", "v1"))
    m.apply_delete(K.manifest("a/b", D))
    m.apply_delete(K.blob_in(S, "a/b"))
    m.apply_delete(K.blob(S))
    assert m.repo("a/b").sorted_tags() == ["v2"]
    assert ("a/b", S) not in m.referrers and S not in m.blobs


@pytest.mark.parametrize("n,last,expected,more", [
    (None, None, ["a", "b", "c", "d"], False), (2, None, ["a", "b"], True), (2, "b", ["c", "d"], False),
    (0, None, [], True), (10, "d", [], False), (1, "bb", ["c"], True),
])
def test_page(n, last, expected, more):
    assert page(["a", "b", "c", "d"], n, last) == (expected, more)


@pytest.mark.anyio
async def test_wait_for_revision():
    m = ReadModel(K)
    m.advance(5)
    assert await m.wait_for(5, timeout=0.1)
    assert not await m.wait_for(6, timeout=0.05)
