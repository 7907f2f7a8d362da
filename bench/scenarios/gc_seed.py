"""Synthetic registry state for the GC benchmark (the gc scenario), written straight into etcd.

Pushing 100,000 blobs and 20,000 manifests through the HTTP API takes far too long on a
2-core machine, so this module writes the *same records the node writes* (see
cargohold/coordinator/metadata.py `record_blob` and `put_manifest`) directly:

* a blob:     blobs/<d> = BlobRecord(size, created, created), blobs/<d>/at/<node> for each
              owner, blobs/<d>/in/<repo>
* a manifest: manifests/<repo>/<md> = ManifestRecord(...), blobs/<md> + at + in as for a
              blob, refs/<b>/<repo>@<md> for every referenced blob, tags/<repo>/<tag> = md
* a repo:     repos/<repo> = {"kind": "local"}

All ops of one blob or manifest go into one transaction (so a node watching meanwhile never
sees a blob record without its copies, which would make its replicator fetch), at most
`MAX_OPS` ops per transaction, `CONCURRENCY` transactions in flight.

Copies are placed on the nodes cargohold's own placement would choose (rendezvous hashing,
`cargohold.replication.placement.owners`, read-only), so the replicators have nothing to do.
The blob content is real: every file's bytes hash to its digest (small, 256..2047 bytes),
and the manifests are real OCI image manifests whose digest is the sha256 of their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from cargohold.coordinator.etcd import EtcdClient, Put
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.records import BlobRecord, ManifestRecord, encode_repo
from cargohold.replication.placement import owners

MAX_OPS = 100
CONCURRENCY = 16
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Blob:
    digest: str
    content: bytes
    repo: str
    owners: list[str]


@dataclass
class Manifest:
    repo: str
    tag: str
    digest: str
    body: bytes
    record: ManifestRecord
    owners: list[str]


@dataclass
class Dataset:
    """What was generated: the live and dead blobs, the manifests, and the repositories."""
    label: str
    created: float
    repos: list[str] = field(default_factory=list)
    live: list[Blob] = field(default_factory=list)
    dead: list[Blob] = field(default_factory=list)
    manifests: list[Manifest] = field(default_factory=list)

    def all_blobs(self):
        yield from self.live
        yield from self.dead
        for m in self.manifests:
            yield Blob(m.digest, m.body, m.repo, m.owners)

    def counts(self) -> dict:
        return {"repos": len(self.repos), "manifests": len(self.manifests), "live_blobs": len(self.live),
                "dead_blobs": len(self.dead),
                "blob_records": len(self.live) + len(self.dead) + len(self.manifests),
                "dead_bytes": sum(len(b.content) for b in self.dead)}


def _content(label: str, kind: str, n: int) -> bytes:
    head = f"cargohold gc bench {label} {kind} {n}\n".encode()
    size = 256 + (n * 7919) % 1792
    return head + b"." * max(size - len(head), 0)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def generate(*, label: str, manifests: int, dead: int, nodes: list[str], replicas: int = 2,
             per_repo: int = 100, created: float | None = None, repo_prefix: str = "gcbench/app") -> Dataset:
    """`manifests` tagged image manifests, each referencing a config, two layers of its own and
    a base layer shared by its repository (4 references, 3 distinct blobs per manifest: a live
    pool of 3 x manifests blobs), plus `dead` unreferenced blobs spread over the repositories."""
    created = time.time() - 3 * 3600 if created is None else created
    data = Dataset(label, created)
    n_repos = max(1, -(-max(manifests, 1) // per_repo))
    data.repos = [f"{repo_prefix}-{r:04d}" for r in range(n_repos)]

    def blob(kind: str, n: int, repo: str) -> Blob:
        content = _content(label, kind, n)
        digest = _digest(content)
        return Blob(digest, content, repo, owners(digest, nodes, replicas))

    for i in range(manifests):
        repo = data.repos[i // per_repo]
        config = blob("config", i, repo)
        layers = [blob("layer", 2 * i, repo), blob("layer", 2 * i + 1, repo)]
        data.live += [config, *layers]
        first = data.live[3 * (i - i % per_repo) + 1]          # the repo's first manifest's first layer
        refs = [config, *layers, first]
        body = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": len(config.content)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": b.digest, "size": len(b.content)} for b in refs[1:]],
        }, separators=(",", ":")).encode()
        digest = _digest(body)
        record = ManifestRecord(MANIFEST_TYPE, len(body), tuple(dict.fromkeys(b.digest for b in refs)), (),
                                None, CONFIG_TYPE, created)
        data.manifests.append(Manifest(repo, f"v{i}", digest, body, record, owners(digest, nodes, replicas)))
    for j in range(dead):
        data.dead.append(blob("dead", j, data.repos[j % n_repos]))
    return data


def transactions(data: Dataset, cluster: str, *, include_repos: bool = True) -> list[list[Put]]:
    """The puts, grouped: each blob or manifest whole in one group, groups packed to <= MAX_OPS."""
    keys = Keys(cluster)
    groups: list[list[Put]] = []
    if include_repos:
        groups += [[Put(keys.repo(r), encode_repo())] for r in data.repos]

    def blob_ops(b: Blob, size: int) -> list[Put]:
        return [Put(keys.blob(b.digest), BlobRecord(size, data.created, data.created).encode()),
                *(Put(keys.blob_at(b.digest, n), b"") for n in b.owners), Put(keys.blob_in(b.digest, b.repo), b"")]

    for b in data.live:
        groups.append(blob_ops(b, len(b.content)))
    for m in data.manifests:
        ops = [Put(keys.manifest(m.repo, m.digest), m.record.encode()),
               *blob_ops(Blob(m.digest, m.body, m.repo, m.owners), len(m.body)),
               *(Put(keys.ref(child, m.repo, m.digest), b"") for child in dict.fromkeys(m.record.references())),
               Put(keys.tag(m.repo, m.tag), m.digest.encode())]
        groups.append(ops)
    for b in data.dead:
        groups.append(blob_ops(b, len(b.content)))
    txns: list[list[Put]] = []
    current: list[Put] = []
    for ops in groups:
        if current and len(current) + len(ops) > MAX_OPS:
            txns.append(current)
            current = []
        current.extend(ops)
    if current:
        txns.append(current)
    return txns


async def _seed(etcd_url: str, txns: list[list[Put]], concurrency: int) -> dict:
    started = time.perf_counter()
    last_revision = 0
    async with EtcdClient([etcd_url], request_timeout=30.0) as client:
        send, receive = anyio.create_memory_object_stream(concurrency * 2)

        async def worker(items) -> None:
            nonlocal last_revision
            async with items:
                async for ops in items:
                    result = await client.txn([], ops)
                    last_revision = max(last_revision, result.revision)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for ops in txns:
                    await send.send(ops)
    elapsed = time.perf_counter() - started
    ops = sum(len(t) for t in txns)
    return {"seconds": round(elapsed, 2), "txns": len(txns), "puts": ops, "puts_per_s": round(ops / elapsed),
            "revision": last_revision}


def seed(etcd_url: str, cluster: str, data: Dataset, *, include_repos: bool = True,
         concurrency: int = CONCURRENCY) -> dict:
    """Write the dataset into etcd; returns timings and the last revision written."""
    return anyio.run(_seed, etcd_url, transactions(data, cluster, include_repos=include_repos), concurrency)


def blob_path(data_dir: Path, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return Path(data_dir) / "blobs" / "sha256" / hexd[:2] / hexd


def write_files(data: Dataset, data_dirs: dict[str, Path], blobs=None) -> dict:
    """Each owner's copy of each blob (and manifest) at the node store's path, bytes that hash right."""
    started = time.perf_counter()
    made_dirs: set[Path] = set()
    count = nbytes = 0
    for b in (data.all_blobs() if blobs is None else blobs):
        for node in b.owners:
            path = blob_path(data_dirs[node], b.digest)
            if path.parent not in made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b.content)
            finally:
                os.close(fd)
            count += 1
            nbytes += len(b.content)
    return {"files": count, "bytes": nbytes, "seconds": round(time.perf_counter() - started, 2)}


def files_present(data_dirs: dict[str, Path], blobs) -> int:
    """How many of the owners' copies of `blobs` exist on disk."""
    return sum(1 for b in blobs for node in b.owners if blob_path(data_dirs[node], b.digest).exists())
