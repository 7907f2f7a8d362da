"""Access control as protocol, free of the node's wiring (h11 style: no network, no etcd):
who is asking (`subjects`), token scopes and what a request needs (`scopes`), `Authorization`
headers and the `WWW-Authenticate` challenge (`credentials`), access rules and protected tags
(`rules`), bearer tokens (`tokens`), password hashing and htpasswd text (`passwords`),
failed-login limits (`ratelimit`), the client's address behind trusted proxies (`clients`), the
node-to-node call credential (`peer`) and the hash-chained audit log (`audit`). The node applies
them in `cargohold.node.access`.

May import: `cargohold.oci` and below (`runtime`, `units`, `config`)."""
