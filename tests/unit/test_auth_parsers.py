"""Property tests of every parser that sees untrusted input (hypothesis): names, references,
digests, Range and Content-Range, token scopes, Authorization headers, access rules and manifests.
They never raise anything but their own refusal, and whatever they accept is well formed."""

import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings, strategies as st

from cargohold.oci import errors
from cargohold.node.api import _chunk_range, _pagination
from cargohold.oci.ranges import decimal, parse_range as _parse_range
from cargohold.auth.credentials import parse_authorization
from cargohold.auth.rules import Policy, RulesError
from cargohold.auth.scopes import REPO_ACTIONS, ScopeError, parse_scope
from cargohold.node.http import Request
from cargohold.oci.manifest import SUPPORTED_TYPES, parse_manifest
from cargohold.oci.reference import NAME_RE, TAG_RE, parse_digest, parse_reference, validate_name

# Latin-1 (what a header can carry), with the digits that str.isdigit() accepts and int() refuses.
LATIN1 = st.one_of(st.text(alphabet=st.characters(max_codepoint=255), max_size=80),
                   st.text(alphabet="0123456789\u00b2\u00b3\u00b9-/ ", max_size=12))
NAME_PARTS = st.sampled_from(["a", "b0", "lib", "x-y", "a.b", "a__b", "..", ".", "", "A", "-", "_", "%2e", "/"])
NAMEISH = st.lists(NAME_PARTS, min_size=1, max_size=5).map("/".join)
DIGESTISH = st.one_of(
    st.text(max_size=140),
    st.builds(lambda alg, hexpart: f"{alg}:{hexpart}", st.sampled_from(["sha256", "sha512", "md5", "SHA256", ""]),
              st.text(alphabet="0123456789abcdefABCDEFg/.", max_size=130)),
)


@given(st.one_of(NAMEISH, st.text(max_size=300)))
def test_names(text):
    try:
        name = validate_name(text)
    except errors.RegistryError as exc:
        assert exc.code == "NAME_INVALID"
        return
    assert NAME_RE.fullmatch(name) and len(name) <= 255
    assert all(part not in ("", ".", "..") for part in name.split("/")) and "\\" not in name


@given(st.one_of(DIGESTISH, st.text(alphabet="abcdefgXYZ0123456789._-:/", max_size=140)))
def test_references(text):
    try:
        tag, digest = parse_reference(text)
    except errors.RegistryError as exc:
        assert exc.code in ("MANIFEST_INVALID", "DIGEST_INVALID")
        return
    if digest is None:
        assert TAG_RE.fullmatch(tag) and "/" not in tag and not tag.startswith(".")
    else:
        assert tag is None and str(digest) == text and parse_digest(str(digest)) == digest


@given(DIGESTISH)
def test_digests(text):
    try:
        digest = parse_digest(text)
    except errors.RegistryError as exc:
        assert exc.code == "DIGEST_INVALID"
        return
    assert digest.algorithm in ("sha256", "sha512") and len(digest.hex) == {"sha256": 64, "sha512": 128}[digest.algorithm]
    assert all(c in "0123456789abcdef" for c in digest.hex) and str(digest) == text


# Numbers as a header may carry them, up to thousands of digits (Python's int() refuses 4,300+).
NUMBERS = st.one_of(st.integers(0, 2**70).map(str), st.from_regex(r"\A[0-9]{1,5000}\Z"))

RANGEISH = st.one_of(
    LATIN1,
    st.builds(lambda unit, a, b, extra: f"{unit}{a}-{b}{extra}", st.sampled_from(["bytes=", "bytes =", "items=", ""]),
              st.one_of(st.just(""), NUMBERS), st.one_of(st.just(""), NUMBERS),
              st.sampled_from(["", ",0-1", " ", "-", "/5"])),
)


@given(RANGEISH, st.integers(0, 10**12))
def test_range(header, size):
    try:
        found = _parse_range(header, size)
    except errors.RegistryError as exc:
        assert exc.status == 416 and exc.headers["Content-Range"] == f"bytes */{size}"
        return
    if found is not None:
        start, end = found
        assert 0 <= start <= end < size


def _request(headers: dict[str, str]) -> Request:
    scope = {"method": "PATCH", "path": "/", "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]}
    return Request(scope, None)


CONTENT_RANGEISH = st.one_of(
    LATIN1,
    st.builds(lambda prefix, a, b, total: f"{prefix}{a}-{b}{total}", st.sampled_from(["", "bytes ", "bytes=", "b "]),
              st.one_of(st.integers(-5, 2**66).map(str), NUMBERS), st.one_of(st.integers(-5, 2**66).map(str), NUMBERS),
              st.sampled_from(["", "/*", "/10", "/x"])),
)


@given(st.one_of(st.none(), CONTENT_RANGEISH), st.one_of(st.none(), NUMBERS, LATIN1))
def test_content_range(content_range, content_length):
    headers = {}
    if content_range is not None:
        headers["content-range"] = content_range
    if content_length is not None:
        headers["content-length"] = content_length
    try:
        start, length = _chunk_range(_request(headers))
    except errors.RegistryError as exc:
        assert exc.status == 416 and exc.code == "BLOB_UPLOAD_INVALID"
        return
    declared = decimal(content_length)      # a number past 10**18 reads as 10**18: larger than any blob
    if content_range is None:
        assert start is None and length == declared
    else:
        assert start >= 0 and length >= 1
        assert declared is None or declared == length


@given(st.one_of(st.text(max_size=12), st.text(alphabet="0123456789\u00b2\u0663\uff10-", max_size=12)))
def test_pagination(n):
    scope = {"method": "GET", "path": "/", "headers": [], "query_string": ("n=" + quote(n) + "&last=x").encode()}
    try:
        found, last = _pagination(Request(scope, None))
    except errors.RegistryError as exc:
        assert exc.status == 400
        return
    assert (found is None and n == "") or 0 <= found < 10**9 and str(found) == n.lstrip("0").rjust(1, "0")
    assert last == "x"


SCOPEISH = st.one_of(
    st.text(max_size=120),
    st.builds(lambda t, n, a: f"{t}:{n}:{a}", st.sampled_from(["repository", "registry", "repository(plugin)", "repo", ""]),
              st.one_of(NAMEISH, st.sampled_from(["catalog", "admin"])),
              st.lists(st.sampled_from(["pull", "push", "delete", "*", "x", "", "PULL", "\r\n", '"']), max_size=4).map(",".join)),
)


@given(SCOPEISH)
def test_scopes(text):
    try:
        scope = parse_scope(text)
    except ScopeError:
        return
    rendered = str(scope)
    assert parse_scope(rendered) == scope
    assert all(c.isprintable() and c not in '"\\ ' for c in rendered)
    if scope.type == "repository":
        assert validate_name(scope.name) == scope.name and set(scope.actions) <= set(REPO_ACTIONS) | {"*"}
    else:
        assert scope.type == "registry" and scope.name in ("catalog", "admin") and set(scope.actions) <= {"*"}


@given(st.one_of(LATIN1, st.builds(lambda s, b: f"{s} {b}", st.sampled_from(["Basic", "Bearer", "bearer", "x"]),
                                    st.one_of(st.binary(max_size=60).map(lambda b: __import__("base64").b64encode(b).decode()),
                                              LATIN1))))
def test_authorization(header):
    try:
        creds = parse_authorization(header)
    except ValueError:
        return
    if creds.scheme == "basic":
        assert creds.username and ":" not in creds.username
    else:
        assert creds.scheme == "bearer" and creds.token and all(c.isprintable() and c != " " for c in creds.token)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)
RULE_ENTRY = st.fixed_dictionaries({}, optional={
    "subjects": st.one_of(JSON, st.lists(st.sampled_from(["anonymous", "authenticated", "user:a", "group:g", "x", "robot:"]), max_size=3)),
    "repositories": st.one_of(JSON, st.lists(st.sampled_from(["**", "a/*", "a?", "../x", "", "A"]), max_size=3)),
    "actions": st.one_of(JSON, st.lists(st.sampled_from(["pull", "push", "delete", "admin", "fly"]), max_size=3)),
    "tags": st.lists(st.sampled_from(["v*", "latest", "a/b", ""]), max_size=2),
})


@given(st.one_of(JSON, st.fixed_dictionaries({}, optional={"rules": st.one_of(JSON, st.lists(RULE_ENTRY, max_size=3)),
                                                            "protected_tags": st.one_of(JSON, st.lists(RULE_ENTRY, max_size=2))})))
def test_rules_documents(document):
    try:
        policy = Policy.parse(document)
    except RulesError:
        return
    for rule in policy.rules:
        assert rule.actions <= {"pull", "push", "delete", "admin"} and rule.subjects and rule.patterns


DIGEST = "sha256:" + "a" * 64
DESCRIPTOR = st.one_of(JSON, st.fixed_dictionaries({
    "mediaType": st.sampled_from(["application/vnd.oci.image.layer.v1.tar", "", 5]),
    "digest": st.sampled_from([DIGEST, "sha256:abc", "sha512:" + "b" * 128, 7]),
    "size": st.sampled_from([0, 12, -1, True, "3"]),
}, optional={"urls": JSON, "annotations": JSON, "artifactType": JSON}))
MANIFEST = st.fixed_dictionaries({"schemaVersion": st.sampled_from([2, 1, "2"])}, optional={
    "mediaType": st.sampled_from(sorted(SUPPORTED_TYPES) + ["text/plain", 3]),
    "config": DESCRIPTOR, "layers": st.one_of(JSON, st.lists(DESCRIPTOR, max_size=3)),
    "manifests": st.one_of(JSON, st.lists(DESCRIPTOR, max_size=3)), "subject": DESCRIPTOR,
    "annotations": JSON, "artifactType": JSON,
})


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), MANIFEST.map(lambda d: json.dumps(d).encode())),
       st.one_of(st.none(), st.sampled_from(sorted(SUPPORTED_TYPES) + ["", "text/plain; x=1"])))
def test_manifests(body, content_type):
    try:
        parsed = parse_manifest(body, content_type)
    except errors.RegistryError as exc:
        assert exc.code in ("MANIFEST_INVALID", "SIZE_INVALID")
        return
    assert parsed.media_type in SUPPORTED_TYPES
    for digest in (*parsed.blobs, *parsed.children, *([parsed.subject] if parsed.subject else [])):
        assert parse_digest(str(digest)) == digest
    assert not (parsed.blobs and parsed.children)
    assert parsed.artifact_type is None or isinstance(parsed.artifact_type, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.annotations.items())
