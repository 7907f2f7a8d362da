"""One registry node: the OCI HTTP API (`api`) over a narrow ASGI layer (`http`), upload
sessions, request access control, upload forwarding, metrics, and `server`, which wires every
part of one node process together in one task group.

May import: every package below it (`gc`, `replication`, `coordinator`, `auth`, `blobs`, `oci`,
`runtime`); never `cargohold.cli`."""
