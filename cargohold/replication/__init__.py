"""Moving blobs between nodes: placement (rendezvous hashing over a site's active nodes),
what each node must fetch, drop or wait for (`plan`: pure decisions), the work queue (`work`),
the executor that carries the decisions out (`replicator`), fetches from peers (`fetch`), the
holders to read from (`sources`), the API's remote content over gRPC (`remote`, implementing
`cargohold.blobs.remote.RemoteContent`), the gRPC service and client (`transfer`), status
reports, and the operator's node join/leave (`nodes`).

May import: `cargohold.coordinator` and below. Not `cargohold.gc` (a sibling) nor `cargohold.node`."""
