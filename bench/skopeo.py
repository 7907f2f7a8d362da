"""A whole image pull by a real container client, skopeo, as users see it.

`skopeo copy --src-tls-verify=false docker://HOST:PORT/NAME:TAG dir:DIR` does a client's full work:
the `/v2/` ping (https first, then plain http, as for any insecure registry), the manifest by tag,
then every blob, each digest-verified while it streams, written to a file in DIR and fsync'd (and
noted in skopeo's blob-info cache, as every copy does). skopeo's defaults are kept, because they
are what users get: up to 6 blobs at a time (c/image's `MaxParallelDownloads`), the system's trust
policy, no retries.

`dir:` rather than `oci:`: the bench's layers are random bytes labelled `tar+gzip`; skopeo finds them
uncompressed and would gzip them (and rewrite the manifest) on the way into an OCI layout, which is
a conversion, not a pull. `dir:` keeps every blob and the manifest byte for byte, which `pull`
checks afterwards. Each pull gets a fresh directory, deleted after the pull (untimed)."""

from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench import oci
from bench.pull import Image, Pull, PullError

SKOPEO = shutil.which("skopeo")


def missing() -> str | None:
    """Why skopeo cannot be used here, or None."""
    return None if SKOPEO else "skopeo not found on PATH (apt-get install -y skopeo)"


def describe() -> str:
    """What one pull is, for a row's note."""
    r = subprocess.run([SKOPEO, "--version"], capture_output=True, text=True, timeout=30)
    version = r.stdout.strip().removeprefix("skopeo version ") or "(unknown version)"
    return (f"`skopeo copy --src-tls-verify=false docker://HOST:PORT/NAME:TAG dir:DIR` (skopeo {version}, "
            "its defaults: up to 6 blobs at a time, each digest-verified, written to a fresh DIR on disk "
            "and fsync'd; timed from process start to exit, DIR deleted untimed)")


def pull(base_url: str, name: str, image: Image, scratch: Path) -> Pull:
    """Pull `image` as `name:tag` from the registry at `base_url` into a new directory under
    `scratch`. Timed: the skopeo process from start to exit. Its CPU (user + sys) is recorded."""
    scratch.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="skopeo-", dir=scratch))
    target = workdir / "image"
    source = f"docker://{urlsplit(base_url).netloc}/{name}:{image.tag}"
    try:
        cpu_before = _children_cpu()
        t0 = time.perf_counter()
        r = subprocess.run([SKOPEO, "copy", "--src-tls-verify=false", source, f"dir:{target}"],
                           capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t0
        cpu = _children_cpu() - cpu_before
        if r.returncode != 0:
            raise PullError(f"skopeo copy {source}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
        _check_copy(target, image, source)
        return Pull(seconds, image.size, client_cpu_s=cpu)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _children_cpu() -> float:
    """User + sys seconds of this process's reaped children (skopeo is the only one reaped
    while a pull runs: the nodes and registries live on)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _check_copy(target: Path, image: Image, source: str) -> None:
    """The copy is the image unchanged: the manifest's own bytes and every blob at its size
    (skopeo verified each blob's digest while it read it)."""
    manifest = (target / "manifest.json").read_bytes()
    if oci.digest_of(manifest) != image.digest:
        raise PullError(f"skopeo copy {source}: the manifest written is not the pushed one")
    for blob in image.blobs:
        path = target / blob.digest.removeprefix("sha256:")
        size = path.stat().st_size if path.exists() else None
        if size != blob.size:
            raise PullError(f"skopeo copy {source}: blob {blob.digest} has {size} bytes, expected {blob.size}")
