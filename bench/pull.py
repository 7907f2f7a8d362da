"""An image pull as a container runtime does it, with a native client (curl): the manifest by
tag, then the config and every layer, at most three downloads at a time (docker's default
`max-concurrent-downloads`), each into /dev/null. The images are pushed from files, so a big
one never sits in memory. Used by the `pullthrough` scenario; any registry URL works."""

from __future__ import annotations

import collections
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import oci

CONCURRENT_DOWNLOADS = 3
ACCEPT = ", ".join([oci.OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])
CACHE_HEADER = "x-cargohold-cache"
CURL = ["curl", "-sS", "--no-progress-meter", "--fail", "--noproxy", "*"]
# One line per transfer; the cache header (empty on other registries) last, in brackets.
_WRITE_OUT = ("%{http_code} %{size_download} %{time_starttransfer} %{url_effective} [%header{"
              + CACHE_HEADER + "}]\n")


@dataclass(frozen=True)
class Blob:
    path: Path
    digest: str
    size: int


@dataclass(frozen=True)
class Image:
    """An OCI image whose config and layers are files on disk."""
    name: str
    tag: str
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    @property
    def manifest(self) -> bytes:
        return oci.manifest_bytes((self.config.digest, self.config.size),
                                  [(b.digest, b.size) for b in self.layers])

    @property
    def digest(self) -> str:
        return oci.digest_of(self.manifest)

    @property
    def size(self) -> int:
        """Bytes a pull moves: the manifest and every blob."""
        return len(self.manifest) + sum(b.size for b in self.blobs)


def make_image(directory: Path, name: str, tag: str, layer_sizes: list[int], seed: int) -> Image:
    """Random (incompressible) layers of the given sizes, distinct per seed, and a config."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = name.replace("/", "_")
    layers = []
    for i, size in enumerate(layer_sizes):
        path = directory / f"{stem}-layer{i}"
        layers.append(Blob(path, oci.make_file(path, size, seed + i), size))
    config_bytes = json.dumps({"architecture": "amd64", "os": "linux",
                               "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]}},
                              sort_keys=True).encode()
    config_path = directory / f"{stem}-config"
    config_path.write_bytes(config_bytes)
    return Image(name, tag, Blob(config_path, oci.digest_of(config_bytes), len(config_bytes)), tuple(layers))


def push(base_url: str, image: Image) -> None:
    """Every blob (the registry's cheapest whole-blob flow), then the manifest under its tag."""
    with oci.client(base_url) as c:
        single_post = oci.supports_single_post(c, image.name)
        for blob in image.blobs:
            oci.push_blob_file(c, image.name, blob.path, blob.digest, single_post)
        oci.push_manifest(c, image.name, image.tag, image.manifest)


def verify(base_url: str, name: str, image: Image) -> None:
    """Every blob of `image` read back under `name` and its sha256 checked (untimed)."""
    with oci.client(base_url) as c:
        for blob in image.blobs:
            oci.verify_blob(c, name, blob.digest, blob.size)


@dataclass
class Pull:
    seconds: float
    bytes: int
    first_byte_s: float | None = None  # the slowest blob's time to its first byte (streaming vs store-then-serve)
    cache: collections.Counter = field(default_factory=collections.Counter)  # X-Cargohold-Cache values
    client_cpu_s: float | None = None  # user + sys of the client process, when it is measured

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds


class PullError(RuntimeError):
    pass


def pull(base_url: str, name: str, image: Image) -> Pull:
    """Pull `image` from `base_url` as `name:tag`; the manifest must be the image's own bytes and
    every blob must arrive whole (status and size; `verify` checks content)."""
    t0 = time.perf_counter()
    body, cache = _get_manifest(f"{base_url}/v2/{name}/manifests/{image.tag}")
    if oci.digest_of(body) != image.digest:
        raise PullError(f"{base_url}/v2/{name}: the manifest of {image.tag} is not the pushed one")
    document = json.loads(body)
    descriptors = [document["config"], *document["layers"]]
    caches, first_byte_s = _get_blobs(base_url, name, {d["digest"]: d["size"] for d in descriptors})
    seconds = time.perf_counter() - t0
    return Pull(seconds, len(body) + sum(d["size"] for d in descriptors), first_byte_s,
                collections.Counter([cache, *caches]))


def _get_manifest(url: str) -> tuple[bytes, str]:
    """(body, cache header): the body on stdout, curl's summary on stderr."""
    r = subprocess.run([*CURL, "-H", f"Accept: {ACCEPT}", "-o", "-",
                        "-w", "%{stderr}%{http_code} [%header{" + CACHE_HEADER + "}]", url],
                       capture_output=True, timeout=120)
    summary = r.stderr.decode(errors="replace").strip()
    if r.returncode != 0:
        raise PullError(f"GET {url}: curl exit {r.returncode}: {summary[-500:]}")
    code, _, cache = summary.rpartition("\n")[2].partition(" ")
    if code != "200":
        raise PullError(f"GET {url}: HTTP {code}")
    return r.stdout, cache.strip("[]")


def _get_blobs(base_url: str, name: str, sizes: dict[str, int]) -> tuple[list[str], float]:
    """GET every blob, CONCURRENT_DOWNLOADS at a time, into /dev/null; their cache headers and
    the longest time to a first byte."""
    cmd = [*CURL, "--parallel", "--parallel-max", str(CONCURRENT_DOWNLOADS), "-w", _WRITE_OUT]
    for digest in sizes:
        cmd += ["-o", "/dev/null", f"{base_url}/v2/{name}/blobs/{digest}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise PullError(f"blobs of {name} from {base_url}: curl exit {r.returncode}: {r.stderr.strip()[-500:]}")
    caches, seen, first_byte_s = [], set(), 0.0
    for line in r.stdout.splitlines():
        head, _, cache = line.partition(" [")
        code, got, first_byte, url = head.split(" ", 3)
        digest = url.rsplit("/", 1)[1]
        if code != "200" or int(got) != sizes.get(digest):
            raise PullError(f"GET {url}: HTTP {code}, {got} bytes (expected 200, {sizes.get(digest)})")
        seen.add(digest)
        first_byte_s = max(first_byte_s, float(first_byte))
        caches.append(cache.rstrip("]"))
    if seen != set(sizes):
        raise PullError(f"blobs of {name}: curl reported {len(seen)} of {len(sizes)} transfers")
    return caches, first_byte_s

