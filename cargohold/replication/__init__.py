"""Moving blobs between nodes: placement (rendezvous hashing over a site's active nodes),
what each node must fetch or drop, the gRPC service and client (`transfer`), the replicator that
carries the decisions out, status reports, and the operator's node join/leave (`nodes`).

May import: `cargohold.coordinator` and below. Not `cargohold.gc` (a sibling) nor `cargohold.node`."""
