"""Repository names, tags and digests: parsing and validation, free of I/O.

Everything that reaches the file system or etcd keys from a URL passes through here
first, so a name, tag, digest or upload id that is accepted is safe to use in a path.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cargohold.oci import errors

# OCI distribution-spec v1.1 grammar.
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# 32 random hex characters, then 8 naming the node that holds the session (node/forward.py).
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{40}")
MAX_NAME_LENGTH = 255

# Algorithms we accept, with the length of their hex encoding.
_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self):
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> "Digest":
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_digest(text: str) -> Digest:
    """Parse `algorithm:hex`; anything else is DIGEST_INVALID."""
    algorithm, sep, encoded = text.partition(":")
    expected_length = _ALGORITHMS.get(algorithm)
    if not sep or expected_length is None:
        raise errors.digest_invalid(f"unsupported or malformed digest {text[:80]!r}")
    if len(encoded) != expected_length or not _HEX_RE.fullmatch(encoded):
        raise errors.digest_invalid(f"malformed {algorithm} digest {text[:80]!r}")
    return Digest(algorithm, encoded)


def is_digest(text: str) -> bool:
    return ":" in text


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise errors.name_invalid(f"invalid repository name {name[:80]!r}", {"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise errors.manifest_invalid(f"invalid tag {tag[:80]!r}", {"tag": tag[:200]})
    return tag


def validate_upload_id(upload_id: str) -> str:
    if not UPLOAD_ID_RE.fullmatch(upload_id):
        raise errors.blob_upload_unknown(f"unknown upload id {upload_id[:80]!r}")
    return upload_id


def parse_reference(reference: str) -> tuple[str | None, Digest | None]:
    """A manifest reference is a tag or a digest: returns (tag, None) or (None, digest).

    For a PUT a malformed one is the client's error: 400 MANIFEST_INVALID for a tag (v1.1 lists
    no TAG_INVALID code any more), DIGEST_INVALID for a digest."""
    if is_digest(reference):
        return None, parse_digest(reference)
    return validate_tag(reference), None


def lookup_reference(reference: str) -> tuple[str | None, Digest | None]:
    """`parse_reference` for reading or deleting: a reference that is neither a valid tag nor a
    valid digest names no manifest, so it is 404 MANIFEST_UNKNOWN (as Distribution and zot
    answer, and as the conformance suite expects), not a 400."""
    try:
        return parse_reference(reference)
    except errors.RegistryError:
        raise errors.manifest_unknown(detail={"reference": reference[:200]}) from None
