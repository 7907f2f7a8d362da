"""The small OCI Distribution client of every scenario (httpx). Functions take a client and,
for a client without a base URL (one client, many nodes), `base=URL`."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
from pathlib import Path
from urllib.parse import urljoin

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

MiB = 1 << 20
IO_CHUNK = 4 * MiB


class RegistryError(RuntimeError):
    pass


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check(r: httpx.Response, *codes: int) -> httpx.Response:
    if r.status_code not in codes:
        body = r.read()[:400] if not r.is_stream_consumed else b""
        raise RegistryError(f"{r.request.method} {r.request.url} -> {r.status_code} "
                            f"(expected {codes}): {body!r}")
    return r


def client(base_url: str, **kw) -> httpx.Client:
    kw.setdefault("timeout", httpx.Timeout(300.0, connect=10.0))
    return httpx.Client(base_url=base_url, **kw)


# --------------------------------------------------------------------------- content files

def make_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes (distinct per seed) and return its digest."""
    rnd = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(IO_CHUNK, left)
            b = rnd.randbytes(n)
            h.update(b)
            f.write(b)
            left -= n
    return "sha256:" + h.hexdigest()


def _file_chunks(path: Path, start: int = 0, length: int | None = None, chunk: int = IO_CHUNK):
    with open(path, "rb") as f:
        f.seek(start)
        left = os.fstat(f.fileno()).st_size - start if length is None else length
        while left > 0:
            b = f.read(min(chunk, left))
            if not b:
                raise IOError(f"{path} shorter than expected")
            left -= len(b)
            yield b


# --------------------------------------------------------------------------- blob push

def push_blob(c: httpx.Client, repo: str, data: bytes, digest: str | None = None, *, base: str = "") -> str:
    """Monolithic ``POST /v2/<repo>/blobs/uploads/?digest=`` with the body.

    A registry that does not take the body on the POST (Distribution 2.x
    answers 202, as the spec allows) gets it with a single PUT to the Location,
    the spec's fallback.
    """
    digest = digest or digest_of(data)
    r = c.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
               headers={"Content-Type": "application/octet-stream"})
    if r.status_code == 202:
        loc = urljoin(str(r.url), r.headers["Location"])
        r = c.put(_with_digest(loc, digest), content=data,
                  headers={"Content-Type": "application/octet-stream"})
    _check(r, 201)
    return digest


def push_blob_docker(c: httpx.Client, repo: str, data: bytes, digest: str, *, base: str = "") -> None:
    """What `docker push` does for a layer: HEAD (404), POST, PATCH with the body, PUT ?digest=."""
    _check(c.head(f"{base}/v2/{repo}/blobs/{digest}"), 404)
    r = _check(c.post(f"{base}/v2/{repo}/blobs/uploads/"), 202)
    r = _check(c.patch(urljoin(str(r.url), r.headers["Location"]), content=data,
                       headers={"Content-Type": "application/octet-stream"}), 202)
    _check(c.put(_with_digest(urljoin(str(r.url), r.headers["Location"]), digest)), 201)


async def apush_blob(c: httpx.AsyncClient, repo: str, data: bytes) -> str:
    """`push_blob` for an async client with a base URL (a registry that takes the POST body)."""
    digest = digest_of(data)
    _check(await c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
                        headers={"Content-Type": "application/octet-stream"}), 201)
    return digest


async def apush_manifest(c: httpx.AsyncClient, repo: str, tag: str, body: bytes) -> None:
    _check(await c.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST}), 201)


def supports_single_post(c: httpx.Client, repo: str) -> bool:
    """Does ``POST ?digest=`` with a body complete the upload (201), or answer 202?"""
    data = b"single-post-probe"
    r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)},
               content=data, headers={"Content-Type": "application/octet-stream"})
    if r.status_code == 201:
        return True
    _check(r, 202)
    c.delete(urljoin(str(r.url), r.headers["Location"]))  # abandon the session
    return False


def push_blob_file_monolithic(c: httpx.Client, repo: str, path: Path, digest: str, *, base: str = "") -> float:
    """Monolithic POST ``?digest=`` streaming ``path``; seconds until the 201 arrived."""
    size = path.stat().st_size
    t0 = time.perf_counter()
    r = c.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest},
               content=_file_chunks(path),
               headers={"Content-Type": "application/octet-stream",
                        "Content-Length": str(size)})
    _check(r, 201)
    return time.perf_counter() - t0


def push_blob_file_post_put(c: httpx.Client, repo: str, path: Path, digest: str) -> float:
    """Empty POST (202 + Location), then one PUT ``?digest=`` streaming ``path``."""
    size = path.stat().st_size
    t0 = time.perf_counter()
    r = _check(c.post(f"/v2/{repo}/blobs/uploads/"), 202)
    loc = urljoin(str(r.url), r.headers["Location"])
    r = c.put(_with_digest(loc, digest), content=_file_chunks(path),
              headers={"Content-Type": "application/octet-stream",
                       "Content-Length": str(size)})
    _check(r, 201)
    return time.perf_counter() - t0


def push_blob_file(c: httpx.Client, repo: str, path: Path, digest: str,
                   single_post: bool) -> float:
    """The cheapest whole-blob push the registry supports."""
    if single_post:
        return push_blob_file_monolithic(c, repo, path, digest)
    return push_blob_file_post_put(c, repo, path, digest)


def _with_digest(location: str, digest: str) -> str:
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={digest.replace(':', '%3A')}"


def push_blob_file_chunked(c: httpx.Client, repo: str, path: Path, digest: str,
                           chunk_size: int) -> float:
    """POST, then PATCH with Content-Range per ``chunk_size`` chunk, then PUT ?digest=.

    Returns seconds from the POST to the 201 of the closing PUT.
    """
    size = path.stat().st_size
    t0 = time.perf_counter()
    r = _check(c.post(f"/v2/{repo}/blobs/uploads/"), 202)
    loc = urljoin(str(r.url), r.headers["Location"])
    off = 0
    while off < size:
        n = min(chunk_size, size - off)
        r = c.patch(loc, content=_file_chunks(path, off, n),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Length": str(n),
                             "Content-Range": f"{off}-{off + n - 1}"})
        _check(r, 202)
        loc = urljoin(str(r.url), r.headers["Location"])
        off += n
    r = c.put(_with_digest(loc, digest), headers={"Content-Length": "0"})
    _check(r, 201)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- blob pull

def pull_blob_hashed(c: httpx.Client, repo: str, digest: str, expect_size: int) -> float:
    """GET the blob streamed (bytes are dropped), sha256 computed in a second thread.

    The reading thread only hands buffers to a hasher thread through a bounded
    queue; hashlib releases the GIL on large buffers, so hashing overlaps with
    the next reads instead of stalling them.  Returns seconds from the request
    to the last byte; the digest is checked afterwards (RegistryError if wrong).
    """
    q: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
    h = hashlib.sha256()

    def hasher():
        while (b := q.get()) is not None:
            h.update(b)

    th = threading.Thread(target=hasher, daemon=True)
    th.start()
    got = 0
    t0 = time.perf_counter()
    try:
        with c.stream("GET", f"/v2/{repo}/blobs/{digest}") as r:
            _check(r, 200)
            for b in r.iter_raw(IO_CHUNK):
                got += len(b)
                q.put(b)
        elapsed = time.perf_counter() - t0
    finally:
        q.put(None)
        th.join()
    if got != expect_size:
        raise RegistryError(f"pulled {got} bytes of {digest}, expected {expect_size}")
    if "sha256:" + h.hexdigest() != digest:
        raise RegistryError(f"pulled bytes of {digest} hash to sha256:{h.hexdigest()}")
    return elapsed


def verify_blob(c: httpx.Client, repo: str, digest: str, expect_size: int) -> None:
    pull_blob_hashed(c, repo, digest, expect_size)


# --------------------------------------------------------------------------- images

def image_blobs(seed: int = 1, layer_size: int = 1024) -> dict[str, bytes]:
    rnd = random.Random(seed)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/app"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
    }, sort_keys=True).encode()
    layer = rnd.randbytes(layer_size)
    return {"config": config, "layer": layer}


def random_bytes(size: int, seed: str | int) -> bytes:
    return random.Random(seed).randbytes(size)


def manifest_bytes(config: tuple[str, int], layers: list[tuple[str, int]],
                   annotations: dict[str, str] | None = None) -> bytes:
    """An OCI image manifest from (digest, size) of its config and layers."""
    m = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": n} for d, n in layers],
    }
    if annotations:
        m["annotations"] = annotations
    return json.dumps(m, sort_keys=True, separators=(",", ":")).encode()


def manifest_for(blobs: dict[str, bytes], annotations: dict[str, str] | None = None) -> bytes:
    return manifest_bytes((digest_of(blobs["config"]), len(blobs["config"])),
                          [(digest_of(blobs["layer"]), len(blobs["layer"]))], annotations)


def push_manifest(c: httpx.Client, repo: str, ref: str, body: bytes, *, base: str = "") -> str:
    _check(c.put(f"{base}/v2/{repo}/manifests/{ref}", content=body, headers={"Content-Type": OCI_MANIFEST}), 201)
    return digest_of(body)


def push_image(c: httpx.Client, repo: str, tag: str, seed: int = 1) -> tuple[bytes, str]:
    blobs = image_blobs(seed)
    for b in blobs.values():
        push_blob(c, repo, b)
    body = manifest_for(blobs)
    digest = push_manifest(c, repo, tag, body)
    return body, digest


def get_manifest(c: httpx.Client, repo: str, ref: str) -> httpx.Response:
    return _check(c.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST}), 200)
