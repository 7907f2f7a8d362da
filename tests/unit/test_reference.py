import hashlib

import pytest
from hypothesis import given, strategies as st

from cargohold.oci import errors
from cargohold.oci.reference import (
    NAME_RE, Digest, lookup_reference, parse_digest, parse_reference, validate_name, validate_tag, validate_upload_id,
)


@pytest.mark.parametrize("name", ["a", "library/ubuntu", "a/b/c", "my-app", "my__app", "a.b", "a--b", "x" * 255])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Upper", "a/../b", "..", "/a", "a/", "a//b", "-a", "a-", "a_", "a:b",
                                  "a/./b", "x" * 256, "a b", "a\nb", "%2e%2e"])
def test_invalid_names(name):
    with pytest.raises(errors.RegistryError) as info:
        validate_name(name)
    assert info.value.code == "NAME_INVALID" and info.value.status == 400


def test_digest_roundtrip_and_algorithms():
    data = b"hello"
    for algorithm in ("sha256", "sha512"):
        d = Digest.of(data, algorithm)
        assert d.hex == hashlib.new(algorithm, data).hexdigest()
        assert parse_digest(str(d)) == d


@pytest.mark.parametrize("text", ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 32, "sha256", "sha256:" + "a" * 63,
                                  "sha512:" + "a" * 64, "sha256:" + "g" * 64, "sha256:../../etc/passwd"])
def test_invalid_digests(text):
    with pytest.raises(errors.RegistryError) as info:
        parse_digest(text)
    assert info.value.code == "DIGEST_INVALID"


def test_tags_and_references():
    assert parse_reference("v1.0") == ("v1.0", None)
    tag, digest = parse_reference("sha256:" + "a" * 64)
    assert tag is None and digest.algorithm == "sha256"
    for bad in (".hidden", "-x", "a" * 129, "a/b", ""):
        with pytest.raises(errors.RegistryError):
            validate_tag(bad)


@pytest.mark.parametrize("reference", [".INVALID_MANIFEST_NAME", "-x", "a" * 129, "sha256:1234", "md5:" + "a" * 32])
def test_a_reference_that_cannot_exist_is_unknown_to_readers_and_invalid_to_writers(reference):
    with pytest.raises(errors.RegistryError) as read:
        lookup_reference(reference)
    assert (read.value.code, read.value.status) == ("MANIFEST_UNKNOWN", 404)
    with pytest.raises(errors.RegistryError) as write:
        parse_reference(reference)
    assert write.value.status == 400 and write.value.code in ("MANIFEST_INVALID", "DIGEST_INVALID")


def test_upload_ids_refuse_traversal():
    assert validate_upload_id("0" * 40)
    for bad in ("../x", "0" * 39, "0" * 41, "G" * 40, "..%2f", "0" * 32):
        with pytest.raises(errors.RegistryError) as info:
            validate_upload_id(bad)
        assert info.value.code == "BLOB_UPLOAD_UNKNOWN"


@given(st.text(max_size=300))
def test_name_validation_never_crashes_and_accepts_only_safe_paths(text):
    try:
        name = validate_name(text)
    except errors.RegistryError:
        return
    assert NAME_RE.fullmatch(name) and len(name) <= 255
    assert ".." not in name.split("/") and not name.startswith("/") and "\x00" not in name


@given(st.text(max_size=200))
def test_digest_parsing_never_crashes(text):
    try:
        digest = parse_digest(text)
    except errors.RegistryError:
        return
    assert str(digest) == text and "/" not in text
