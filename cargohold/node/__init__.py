"""One registry node: the OCI HTTP API (`api`) over a narrow ASGI layer (`http`), upload
sessions, limits on slow and idle clients (`limits`), request access control (`access`), the
first administrator from the environment (`bootstrap`), upload forwarding, metrics, and
`server`, which wires every part of one node process together in one task group.

May import: every package below it (`gc`, `replication`, `coordinator`, `auth`, `blobs`,
`upstream`, `oci`, `runtime`); never `cargohold.cli`."""
