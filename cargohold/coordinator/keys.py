"""The etcd key layout of one cluster (DESIGN.md, "State in etcd").

Only this module spells keys. Repository names contain '/', tags and digests never do, and
node ids are validated not to, so every key below parses back unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedKey:
    kind: str                 # "repo", "tag", "manifest", "blob", "blob_at", "blob_in", "member", "alive",
                              # "tombstone", "gc_run", "gc_leader", "policies", "other"
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

    def refs_from_repo_prefix(self, child: str, repo: str) -> str:
        """References to `child` from the manifests of `repo` (no repository name contains '@')."""
        return f"{self.prefix}refs/{child}/{repo}@"

    # -- blobs
    def blob(self, digest: str) -> str:
        return f"{self.prefix}blobs/{digest}"

    def blob_at(self, digest: str, node_id: str) -> str:
        return f"{self.prefix}blobs/{digest}/at/{node_id}"

    def blob_in(self, digest: str, repo: str) -> str:
        """The blob is linked into a repository: pushed, mounted or referenced there."""
        return f"{self.prefix}blobs/{digest}/in/{repo}"

    def blob_in_prefix(self, digest: str) -> str:
        return f"{self.prefix}blobs/{digest}/in/"

    def tombstone(self, digest: str) -> str:
        return f"{self.prefix}gc/tombstones/{digest}"

    def tombstones_prefix(self) -> str:
        return f"{self.prefix}gc/tombstones/"

    # -- garbage collection and policies
    def gc_leader(self) -> str:
        return f"{self.prefix}gc/leader"

    def gc_run(self, run_id: str) -> str:
        return f"{self.prefix}gc/runs/{run_id}"

    def policies(self) -> str:
        return f"{self.prefix}policies/rules"

    def replication_rules(self) -> str:
        return f"{self.prefix}policies/replication"

    def node_status(self, node_id: str) -> str:
        """A node's replication figures, bound to its lease (for `replication status`)."""
        return f"{self.prefix}status/{node_id}"

    def section_prefix(self, section: str) -> str:
        """`manifests/`, `tags/`, `blobs/`, ...: whole sections, for the GC's snapshot."""
        return f"{self.prefix}{section}/"

    # -- pull-through cache usage (issue 14, eviction): read and written by coordinator/cacheusage.py only
    def cache_pulled(self, repo: str) -> str:
        """When a cached image (`hub/library/alpine`) was last pulled: unix time, written in batches."""
        return f"{self.prefix}cache/pulled/{repo}"

    def cache_pulled_prefix(self, namespace: str) -> str:
        """The last-pulled times of every cached image of a remote repository."""
        return f"{self.prefix}cache/pulled/{namespace}/"
    # -- end of pull-through cache usage

    # -- membership
    def member(self, node_id: str) -> str:
        return f"{self.prefix}members/{node_id}"

    def alive(self, node_id: str) -> str:
        return f"{self.prefix}alive/{node_id}"

    def probe(self, node_id: str) -> str:
        """Written by a node's readiness check; it comes back through the node's own watch."""
        return f"{self.prefix}probes/{node_id}"

    # -- accounts and access (issue 6): read and written by coordinator/accounts.py only
    def auth_prefix(self) -> str:
        return f"{self.prefix}auth/"

    def user(self, name: str) -> str:
        return f"{self.prefix}auth/users/{name}"

    def robot(self, name: str) -> str:
        return f"{self.prefix}auth/robots/{name}"

    def access_rules(self) -> str:
        return f"{self.prefix}auth/rules"

    def signing_key(self, key_id: str) -> str:
        return f"{self.prefix}auth/keys/{key_id}"

    def peer_secret(self) -> str:
        """The secret nodes sign their gRPC calls to each other with (coordinator/peersecret.py)."""
        return f"{self.prefix}auth/peer-secret"

    def parse_auth(self, key: str) -> tuple[str, str]:
        """(section, name) of a key under auth/: ("users", "alice"), ("rules", ""), ("keys", kid)."""
        section, _, name = key[len(self.auth_prefix()):].partition("/")
        return section, name
    # -- end of accounts and access

    # -- pull-through blob fills (issue 14): read and written by coordinator/fills.py only
    def fill(self, digest: str) -> str:
        """The cluster-wide claim on fetching `digest` from an upstream, bound to the filler's lease."""
        return f"{self.prefix}fills/{digest}"
    # -- end of pull-through blob fills

    # -- pull-through cache (issue 14, engine-manifests): written by coordinator/cachecheck.py only
    def cache_checked(self, repo: str, tag: str) -> str:
        """When `repo`'s `tag` was last confirmed with its upstream (ignored by the read model)."""
        return f"{self.prefix}cache/checked/{repo}/{tag}"
    # -- end of pull-through cache (engine-manifests)

    # -- upstreams assumed offline, per site: written by coordinator/upstreamstate.py only
    def upstream_offline(self, site: str, repository: str) -> str:
        """Until when the nodes of `site` assume `repository`'s upstream offline (ignored by the read model)."""
        return f"{self.prefix}upstream/offline/{site}/{repository}"

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
        if section == "gc":
            if rest.startswith("tombstones/"):
                return ParsedKey("tombstone", digest=rest[len("tombstones/"):])
            if rest.startswith("runs/"):
                return ParsedKey("gc_run", name=rest[len("runs/"):])
            if rest == "leader":
                return ParsedKey("gc_leader")
        if section == "policies" and rest == "rules":
            return ParsedKey("policies")
        if section == "policies" and rest == "replication":
            return ParsedKey("replication_rules")
        if section == "status":
            return ParsedKey("node_status", name=rest)
        return ParsedKey("other")
