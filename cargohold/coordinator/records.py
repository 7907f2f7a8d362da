"""The small JSON documents stored as etcd values, and their in-memory forms."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from cargohold.oci.manifest import ParsedManifest

ARTIFACT_TYPE_KEPT = 256      # characters of artifactType kept in etcd (values stay small)


def _intern(value: str | None) -> str | None:
    # The same digests and media types recur across thousands of records; share one string.
    return sys.intern(value) if value is not None else None


@dataclass(slots=True, frozen=True)
class ManifestRecord:
    media_type: str
    size: int
    blobs: tuple[str, ...]
    children: tuple[str, ...]
    subject: str | None
    artifact_type: str | None
    created: float

    @classmethod
    def of(cls, parsed: ParsedManifest, size: int, created: float) -> "ManifestRecord":
        """The record of a manifest pushed, or fetched by a remote repository."""
        artifact_type = parsed.artifact_type[:ARTIFACT_TYPE_KEPT] if parsed.artifact_type else None
        return cls(parsed.media_type, size, tuple(str(b) for b in parsed.blobs),
                   tuple(str(c) for c in parsed.children), str(parsed.subject) if parsed.subject else None,
                   artifact_type, created)

    def encode(self) -> bytes:
        document = {
            "mediaType": self.media_type,
            "size": self.size,
            "blobs": list(self.blobs),
            "manifests": list(self.children),
            "created": self.created,
        }
        if self.subject:
            document["subject"] = self.subject
        if self.artifact_type:
            document["artifactType"] = self.artifact_type
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ManifestRecord":
        d = json.loads(raw)
        return cls(
            _intern(d["mediaType"]),
            int(d["size"]),
            tuple(_intern(b) for b in d.get("blobs", ())),
            tuple(_intern(m) for m in d.get("manifests", ())),
            _intern(d.get("subject")),
            _intern(d.get("artifactType")),
            float(d.get("created", 0.0)),
        )

    def references(self) -> tuple[str, ...]:
        """Everything this manifest keeps alive or points at (reverse reference keys)."""
        refs = self.blobs + self.children
        return refs + (self.subject,) if self.subject else refs


@dataclass(slots=True, frozen=True)
class BlobRecord:
    size: int
    created: float
    touched: float = 0.0     # last HEAD/GET/mount/re-upload that refreshed the GC grace hold

    @property
    def held_since(self) -> float:
        """The GC never sweeps a blob whose hold is younger than the grace period."""
        return max(self.created, self.touched)

    def encode(self) -> bytes:
        document = {"size": self.size, "created": self.created}
        if self.touched:
            document["touched"] = self.touched
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "BlobRecord":
        d = json.loads(raw)
        return cls(int(d["size"]), float(d.get("created", 0.0)), float(d.get("touched", 0.0)))


def encode_repo(kind: str = "local") -> bytes:
    return json.dumps({"kind": kind}).encode()


@dataclass(frozen=True)
class Member:
    node_id: str
    site: str
    url: str
    grpc: str
    state: str
    version: str = ""

    def encode(self) -> bytes:
        return json.dumps({"site": self.site, "url": self.url, "grpc": self.grpc,
                           "state": self.state, "version": self.version}).encode()

    @classmethod
    def decode(cls, node_id: str, raw: bytes) -> "Member":
        d = json.loads(raw)
        return cls(node_id, d.get("site", "default"), d.get("url", ""), d.get("grpc", ""),
                   d.get("state", "active"), d.get("version", ""))

    def with_state(self, state: str) -> "Member":
        return Member(self.node_id, self.site, self.url, self.grpc, state, self.version)


@dataclass
class Snapshot:
    """The GC's view of the cluster at one etcd revision: manifests, tags and blobs with mod revisions."""

    revision: int
    manifests: dict[tuple[str, str], tuple[ManifestRecord, int]] = field(default_factory=dict)  # -> (record, mod rev)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)                              # (repo, tag) -> digest
    blobs: dict[str, tuple[BlobRecord, int]] = field(default_factory=dict)                      # digest -> (record, mod rev)
