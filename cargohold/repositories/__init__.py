"""Repository kinds beyond plain local namespaces: what a remote (pull-through cache) repository
is, how it is written down in etcd, and how a request's name is routed to one (`definitions`,
`routing`). Pure: no I/O. The cache that serves them is `cargohold.pullthrough`.

May import: `cargohold.oci` and below (`runtime`, `units`, `config`)."""
