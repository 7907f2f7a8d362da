"""Manifest parsing and validation, free of I/O.

A manifest is accepted only when it is a JSON object of a supported media type whose
descriptors are well formed; what it references is returned so that the caller can check,
in one etcd transaction, that every referenced blob and child manifest exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cargohold.oci import errors
from cargohold.oci.reference import Digest, parse_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
SUPPORTED_TYPES = IMAGE_TYPES | INDEX_TYPES

MAX_MANIFEST_BYTES = 4 * 1024 * 1024

# Layers that registries never hold (Windows base layers): they carry `urls` and are not checked.
_FOREIGN_LAYER_MARKERS = ("foreign", "nondistributable")


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict | None = None
    urls: tuple[str, ...] = ()

    @property
    def is_foreign(self) -> bool:
        return bool(self.urls) and any(m in self.media_type for m in _FOREIGN_LAYER_MARKERS)


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    blobs: tuple[Digest, ...]          # config and layers that must exist in the repository
    children: tuple[Digest, ...]       # index entries: manifests that must exist in the repository
    subject: Digest | None
    artifact_type: str | None          # artifactType, or the config media type of an image manifest
    annotations: dict = field(default_factory=dict)


def _invalid(message: str) -> errors.RegistryError:
    return errors.manifest_invalid(message)


def _descriptor(value: object, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be a descriptor object")
    media_type = value.get("mediaType")
    digest = value.get("digest")
    size = value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}.mediaType must be a non-empty string")
    if not isinstance(digest, str):
        raise _invalid(f"{where}.digest must be a string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.size must be a non-negative integer")
    try:
        parsed = parse_digest(digest)
    except errors.RegistryError:
        raise _invalid(f"{where}.digest {digest[:80]!r} is not a valid digest") from None
    urls = value.get("urls") or ()
    annotations = value.get("annotations")
    if annotations is not None and not _is_string_map(annotations):
        raise _invalid(f"{where}.annotations must map strings to strings")
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid(f"{where}.artifactType must be a string")
    return Descriptor(media_type, parsed, size, artifact_type, annotations,
                      tuple(u for u in urls if isinstance(u, str)))


def _is_string_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _descriptor_list(document: dict, key: str, required: bool) -> list[Descriptor]:
    value = document.get(key)
    if value is None:
        if required:
            raise _invalid(f"{key} is required")
        return []
    if not isinstance(value, list):
        raise _invalid(f"{key} must be an array")
    return [_descriptor(item, f"{key}[{i}]") for i, item in enumerate(value)]


def resolve_media_type(document: dict, content_type: str | None) -> str:
    """The manifest's media type: the Content-Type header, which must agree with the body's field."""
    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType must be a string")
    header = (content_type or "").split(";")[0].strip() or None
    if header and declared and header != declared:
        raise _invalid(f"mediaType {declared!r} does not match Content-Type {header!r}")
    media_type = header or declared
    if media_type is None:
        # Neither says: the spec lets us infer from the structure.
        media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
    if media_type not in SUPPORTED_TYPES:
        raise _invalid(f"unsupported manifest media type {media_type[:120]!r}")
    return media_type


def parse_manifest(body: bytes, content_type: str | None) -> ParsedManifest:
    if len(body) > MAX_MANIFEST_BYTES:
        raise errors.RegistryError("SIZE_INVALID", f"manifest is larger than {MAX_MANIFEST_BYTES} bytes", 413)
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise _invalid("manifest is not valid JSON") from None
    except RecursionError:      # e.g. 100,000 nested arrays: no manifest nests deeper than a few levels
        raise _invalid("manifest nests too deeply") from None
    if not isinstance(document, dict):
        raise _invalid("manifest must be a JSON object")
    if document.get("schemaVersion") != 2:
        raise _invalid("schemaVersion must be 2")
    media_type = resolve_media_type(document, content_type)
    annotations = document.get("annotations") or {}
    if not _is_string_map(annotations):
        raise _invalid("annotations must map strings to strings")
    artifact_type = document.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")
    subject = None
    if document.get("subject") is not None:
        subject = _descriptor(document["subject"], "subject").digest

    if media_type in IMAGE_TYPES:
        if "manifests" in document:
            raise _invalid("an image manifest cannot have manifests")
        config = _descriptor(document.get("config"), "config")
        layers = _descriptor_list(document, "layers", required=media_type == DOCKER_MANIFEST)
        blobs = [config.digest] + [layer.digest for layer in layers if not layer.is_foreign]
        if artifact_type is None:
            artifact_type = config.media_type
        return ParsedManifest(media_type, tuple(dict.fromkeys(blobs)), (), subject, artifact_type, annotations)

    if "config" in document or "layers" in document:
        raise _invalid("an index cannot have config or layers")
    children = _descriptor_list(document, "manifests", required=True)
    return ParsedManifest(media_type, (), tuple(dict.fromkeys(c.digest for c in children)), subject,
                          artifact_type, annotations)
