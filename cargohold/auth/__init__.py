"""Access control as protocol, free of the node's wiring: credentials and the Docker token flow
(tokens, challenges, scopes), access rules and protected tags, password hashing, failed-login
limits, and the hash-chained audit log.

May import: `cargohold.oci` and below (`runtime`, `units`, `config`)."""
