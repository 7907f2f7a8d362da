"""The etcd key layout of one cluster (DESIGN.md, "State in etcd").

Only this module spells keys. Repository names contain '/', tags and digests never do, and
node ids are validated not to, so every key below parses back unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedKey:
    kind: str                 # "repo", "tag", "manifest", "blob", "blob_at", "blob_in", "member", "alive", "tombstone", "other"
    repo: str | None = None
    name: str | None = None   # tag, digest or node id, by kind
    digest: str | None = None


class Keys:
    def __init__(self, cluster: str):
        self.prefix = f"/cargohold/{cluster}/"

    # -- repositories, tags, manifests
    def repo(self, repo: str) -> str:
        return f"{self.prefix}repos/{repo}"

    def repos_prefix(self) -> str:
        return f"{self.prefix}repos/"

    def tag(self, repo: str, tag: str) -> str:
        return f"{self.prefix}tags/{repo}/{tag}"

    def tags_prefix(self, repo: str) -> str:
        return f"{self.prefix}tags/{repo}/"

    def manifest(self, repo: str, digest: str) -> str:
        return f"{self.prefix}manifests/{repo}/{digest}"

    def ref(self, child: str, repo: str, manifest: str) -> str:
        return f"{self.prefix}refs/{child}/{repo}@{manifest}"

    def refs_prefix(self, child: str) -> str:
        return f"{self.prefix}refs/{child}/"

    # -- blobs
    def blob(self, digest: str) -> str:
        return f"{self.prefix}blobs/{digest}"

    def blob_at(self, digest: str, node_id: str) -> str:
        return f"{self.prefix}blobs/{digest}/at/{node_id}"

    def blob_in(self, digest: str, repo: str) -> str:
        """The blob is linked into a repository: pushed, mounted or referenced there."""
        return f"{self.prefix}blobs/{digest}/in/{repo}"

    def tombstone(self, digest: str) -> str:
        return f"{self.prefix}gc/tombstones/{digest}"

    # -- membership
    def member(self, node_id: str) -> str:
        return f"{self.prefix}members/{node_id}"

    def alive(self, node_id: str) -> str:
        return f"{self.prefix}alive/{node_id}"

    def probe(self, node_id: str) -> str:
        """Written by a node's readiness check; it comes back through the node's own watch."""
        return f"{self.prefix}probes/{node_id}"

    def parse(self, key: str) -> ParsedKey:
        if not key.startswith(self.prefix):
            return ParsedKey("other")
        section, _, rest = key[len(self.prefix):].partition("/")
        if section == "tags":
            repo, _, tag = rest.rpartition("/")
            return ParsedKey("tag", repo=repo, name=tag)
        if section == "manifests":
            repo, _, digest = rest.rpartition("/")
            return ParsedKey("manifest", repo=repo, digest=digest)
        if section == "blobs":
            digest, _, sub = rest.partition("/")
            if not sub:
                return ParsedKey("blob", digest=digest)
            relation, _, target = sub.partition("/")
            if relation == "at":
                return ParsedKey("blob_at", digest=digest, name=target)
            if relation == "in":
                return ParsedKey("blob_in", digest=digest, repo=target)
            return ParsedKey("other")
        if section == "repos":
            return ParsedKey("repo", repo=rest)
        if section == "members":
            return ParsedKey("member", name=rest)
        if section == "alive":
            return ParsedKey("alive", name=rest)
        if section == "gc" and rest.startswith("tombstones/"):
            return ParsedKey("tombstone", digest=rest[len("tombstones/"):])
        return ParsedKey("other")
