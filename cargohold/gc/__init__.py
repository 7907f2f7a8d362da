"""Garbage collection: the pure mark phase (`mark`) and the elected leader's online run
(`collector`: retention, mark, sweep with tombstones, cleanup, progress), and what every node
does on its own disk (`node_sweep`: release its condemned copies, scrub after runs).

May import: `cargohold.coordinator` and below. Not `cargohold.replication` (a sibling) nor
`cargohold.node`."""
