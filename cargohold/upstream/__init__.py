"""A client for another OCI/Docker registry, the ground a pull-through cache stands on: the
challenge, token, naming, pagination and failure-classification rules with no I/O (`protocol`),
the "assumed offline" bookkeeping (`offline`), the errors callers branch on (`errors`), a digest
check for bytes as they stream (`verify`) and the async httpx client that puts them together
(`client`). No user-facing surface: nothing here reads settings or etcd.

May import: `cargohold.oci` and below (`runtime`, `units`, `config`)."""
