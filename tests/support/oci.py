"""Pure-Python builders for registry test content, and small httpx push helpers.

Everything here is deterministic for a given seed, so a failing test can be re-run
with the same bytes.  Manifests are serialised once (``canonical_json``) and the
exact bytes are what gets pushed and compared: a registry must give them back byte
for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import httpx

# -- media types ------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_EMPTY_DATA = b"{}"
OCI_EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)


# -- digests ----------------------------------------------------------------------
def digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type: str, data: bytes, **extra) -> dict:
    d = {"mediaType": media_type, "digest": digest(data), "size": len(data)}
    d.update({k: v for k, v in extra.items() if v is not None})
    return d


# -- blobs ------------------------------------------------------------------------
def random_bytes(n: int, seed: int | str = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def random_layer(seed: int | str = 0, files: int = 3, file_size: int = 2048) -> bytes:
    """A gzipped tar of ``files`` random files; the same seed gives the same bytes."""
    rng = random.Random(f"layer-{seed}")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            content = rng.randbytes(file_size)
            info = tarfile.TarInfo(f"data/{seed}/file-{i}.bin")
            info.size = len(content)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(content))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def layer_diff_id(layer_gz: bytes) -> str:
    return digest(gzip.decompress(layer_gz))


def image_config(layers: Iterable[bytes], *, arch: str = "amd64", os: str = "linux",
                 seed: int | str = 0) -> bytes:
    return canonical_json({
        "architecture": arch,
        "os": os,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [f"SEED={seed}"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_diff_id(l) for l in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"test seed {seed}"}],
    })


# -- images -----------------------------------------------------------------------
@dataclass
class Image:
    """A manifest (exact bytes) with everything needed to push it.

    ``blobs`` maps digest -> bytes for config and layers; ``children`` are the
    manifests an index refers to (pushed before the index).
    """

    manifest: bytes
    media_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    children: list["Image"] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def json(self) -> dict:
        return json.loads(self.manifest)

    def descriptor(self, **extra) -> dict:
        return descriptor(self.media_type, self.manifest, **extra)

    def all_blobs(self) -> dict[str, bytes]:
        out = dict(self.blobs)
        for c in self.children:
            out.update(c.all_blobs())
        return out

    def all_manifests(self) -> dict[str, bytes]:
        out = {self.digest: self.manifest}
        for c in self.children:
            out.update(c.all_manifests())
        return out


def oci_manifest(config: bytes, layers: list[bytes], *, config_media_type: str = OCI_CONFIG,
                 layer_media_type: str = OCI_LAYER_GZIP, annotations: Mapping | None = None,
                 artifact_type: str | None = None, subject: Mapping | None = None) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_media_type, config),
        "layers": [descriptor(layer_media_type, l) for l in layers],
    }
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    if subject is not None:
        doc["subject"] = dict(subject)
    if annotations:
        doc["annotations"] = dict(annotations)
    return canonical_json(doc)


def docker_manifest(config: bytes, layers: list[bytes]) -> bytes:
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER_GZIP, l) for l in layers],
    })


def build_image(seed: int | str = 0, *, arch: str = "amd64", layers: int = 2,
                fmt: str = "oci", annotations: Mapping | None = None,
                layer_size: int = 2048) -> Image:
    """A single-platform image: ``fmt`` is "oci" or "docker" (schema2)."""
    layer_blobs = [random_layer(f"{seed}-{arch}-{i}", file_size=layer_size) for i in range(layers)]
    config = image_config(layer_blobs, arch=arch, seed=seed)
    if fmt == "oci":
        body = oci_manifest(config, layer_blobs, annotations=annotations)
        mt = OCI_MANIFEST
    elif fmt == "docker":
        body = docker_manifest(config, layer_blobs)
        mt = DOCKER_MANIFEST
    else:
        raise ValueError(fmt)
    blobs = {digest(b): b for b in [config, *layer_blobs]}
    return Image(body, mt, blobs)


def build_index(seed: int | str = 0, *, archs: Iterable[str] = ("amd64", "arm64"),
                fmt: str = "oci", annotations: Mapping | None = None) -> Image:
    """A multi-arch index (OCI index or Docker manifest list) with one image per arch."""
    children = [build_image(f"{seed}-{a}", arch=a, fmt=fmt) for a in archs]
    entries = [
        c.descriptor(platform={"architecture": a, "os": "linux"})
        for c, a in zip(children, archs)
    ]
    if fmt == "oci":
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        if annotations:
            doc["annotations"] = dict(annotations)
        mt = OCI_INDEX
    else:
        doc = {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries}
        mt = DOCKER_LIST
    return Image(canonical_json(doc), mt, {}, children)


def build_artifact(seed: int | str = 0, *, artifact_type: str = "application/vnd.example.thing.v1",
                   layer_media_type: str = "application/vnd.example.thing.layer.v1+txt",
                   subject: Image | Mapping | None = None,
                   annotations: Mapping | None = None, payload: bytes | None = None) -> Image:
    """An OCI 1.1 artifact: ``artifactType`` + the empty config ``{}``.

    With ``subject`` it is a referrer of that manifest (an ``Image`` or a descriptor).
    """
    data = payload if payload is not None else f"artifact payload {seed}\n".encode()
    subj = subject.descriptor() if isinstance(subject, Image) else subject
    body = oci_manifest(OCI_EMPTY_DATA, [data], config_media_type=OCI_EMPTY,
                        layer_media_type=layer_media_type, annotations=annotations,
                        artifact_type=artifact_type, subject=subj)
    return Image(body, OCI_MANIFEST, {OCI_EMPTY_DIGEST: OCI_EMPTY_DATA, digest(data): data})


def build_referrer_without_artifact_type(seed: int | str, subject: Image | Mapping, *,
                                         config_media_type: str,
                                         annotations: Mapping | None = None) -> Image:
    """A referrer whose type is only given by its config media type (no artifactType)."""
    config = canonical_json({"seed": str(seed)})
    data = f"referrer {seed}".encode()
    subj = subject.descriptor() if isinstance(subject, Image) else subject
    body = oci_manifest(config, [data], config_media_type=config_media_type,
                        layer_media_type="application/octet-stream",
                        annotations=annotations, subject=subj)
    return Image(body, OCI_MANIFEST, {digest(config): config, digest(data): data})


# -- OCI image layout ---------------------------------------------------------------
def write_oci_layout(path: Path | str, images: Mapping[str, Image]) -> Path:
    """Write an OCI image layout directory holding ``images`` keyed by ref name.

    ``index.json`` lists each top-level manifest with the annotation
    ``org.opencontainers.image.ref.name`` = the key, so ``oci:DIR:KEY`` addresses it.
    """
    path = Path(path)
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entries = []
    for ref, img in images.items():
        for d, data in {**img.all_blobs(), **img.all_manifests()}.items():
            algo, hexd = d.split(":", 1)
            (path / "blobs" / algo).mkdir(parents=True, exist_ok=True)
            (path / "blobs" / algo / hexd).write_bytes(data)
        entries.append(img.descriptor(annotations={"org.opencontainers.image.ref.name": ref}))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    (path / "index.json").write_bytes(canonical_json(index))
    return path


def read_oci_layout(path: Path | str) -> tuple[dict, dict[str, bytes]]:
    """(index.json as a dict, every blob in the layout keyed by digest)."""
    path = Path(path)
    index = json.loads((path / "index.json").read_bytes())
    blobs = {}
    for algo_dir in (path / "blobs").iterdir():
        for f in algo_dir.iterdir():
            blobs[f"{algo_dir.name}:{f.name}"] = f.read_bytes()
    return index, blobs


def layout_manifest(path: Path | str, ref: str) -> tuple[dict, bytes]:
    """The index.json entry and the manifest bytes for ref name ``ref``."""
    index, blobs = read_oci_layout(path)
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref:
            return entry, blobs[entry["digest"]]
    raise KeyError(ref)


# -- HTTP helpers ---------------------------------------------------------------------
def error_codes(response: httpx.Response) -> list[str]:
    """The ``code`` of every error in a spec error body (``[]`` if the body isn't one)."""
    try:
        body = response.json()
    except ValueError:
        return []
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return []
    return [e.get("code") for e in body["errors"] if isinstance(e, dict)]


def with_query(location: str, **params: str) -> str:
    """``location`` with ``params`` added to (not replacing) its query string.

    Upload locations are opaque and MAY carry query parameters of their own.
    """
    return str(httpx.URL(location).copy_merge_params(params))


def describe(r: httpx.Response) -> str:
    """A one-line account of a response, for assertion messages."""
    body = r.content[:300] if r.request.method != "HEAD" else b""
    return f"{r.request.method} {r.request.url} -> {r.status_code} {dict(r.headers)} {body!r}"


async def push_blob(client: httpx.AsyncClient, repo: str, data: bytes,
                    algorithm: str = "sha256") -> str:
    """Monolithic ``POST /v2/<repo>/blobs/uploads/?digest=`` (falls back to POST+PUT on 202)."""
    d = digest(data, algorithm)
    r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data,
                          headers={"Content-Type": "application/octet-stream"})
    if r.status_code == 202:  # registry without single-POST uploads: spec says PUT next
        r = await client.put(with_query(r.headers["Location"], digest=d), content=data,
                             headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, describe(r)
    return d


async def push_manifest(client: httpx.AsyncClient, repo: str, ref: str, body: bytes,
                        media_type: str) -> httpx.Response:
    """``PUT /v2/<repo>/manifests/<ref>``; returns the response (not checked)."""
    return await client.put(f"/v2/{repo}/manifests/{ref}", content=body,
                            headers={"Content-Type": media_type})


async def push_image(client: httpx.AsyncClient, repo: str, ref: str | None, image: Image) -> str:
    """Push blobs, child manifests (by digest) and the manifest; return its digest."""
    for data in image.blobs.values():
        await push_blob(client, repo, data)
    for child in image.children:
        await push_image(client, repo, None, child)
    r = await push_manifest(client, repo, ref or image.digest, image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    return image.digest


def raw_request(base_url: str, method: str, path: str, body: bytes = b"",
                headers: Mapping[str, str] | None = None, timeout: float = 30.0):
    """Send a request with ``path`` exactly as given (no dot-segment normalisation or
    re-quoting, unlike httpx), for path-traversal tests.  Synchronous; returns
    ``(status, headers, body)``.
    """
    import http.client

    url = httpx.URL(base_url)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        hdrs = {"Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw_error_codes(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
        return [e.get("code") for e in doc.get("errors", [])]
    except (ValueError, AttributeError):
        return []
