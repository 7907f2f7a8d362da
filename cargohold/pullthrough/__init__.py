"""The pull-through cache behind remote repositories: manifests and tags fetched from the
upstream and revalidated after their ttl, blobs filled once for the whole cluster (a claim in
etcd under a lease) and streamed to the client while they are written and verified, stale
serving while the upstream is down, eviction of what nobody pulls any more (`usage`: batched
last-pulled times, the Evictor).

May import: `cargohold.coordinator` and below."""
