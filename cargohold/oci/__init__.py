"""The OCI Distribution protocol with no I/O, in the h11 style: the spec's error codes
(`errors`), repository names, tags, digests and upload ids (`reference`), manifest parsing and
validation (`manifest`), the numbers of `Range`-family headers (`ranges`), the globs over names and tags that
access rules and repository definitions write (`patterns`). Everything that arrives in a URL or a body passes through here before it
reaches a path, an etcd key or a peer.

May import: `cargohold.runtime`, `cargohold.units`, `cargohold.config`."""
