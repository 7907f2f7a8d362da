"""Cluster state in etcd, and the only package that knows etcd: the async client adapter
(`etcd`), the key layout (`keys`), the JSON records (`records`), the in-memory read model
(`readmodel`), `ClusterMetadata` (the interface every other package uses: reads from the read
model with a linearizable fallback, writes as single transactions), the read barrier that
lets reads by tag see every acknowledged write (`barrier`), GC hold refreshes off the read path
(`holds`), accounts and signing keys, the gRPC peer secret (`peersecret`), policies, group
commit, the garbage collector's leadership and guarded writes (`gcstate`), the withdrawal of a
damaged local copy (`damaged`), the pull-through cache's last-pulled times and the release of
a cached image (`cacheusage`), and the private etcd of a single node (`embedded`).

May import: `cargohold.auth`, `cargohold.blobs`, `cargohold.oci` and below."""
