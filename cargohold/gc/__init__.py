"""Garbage collection: the pure mark phase (`mark`) and the elected leader's online run
(`collector`: retention, mark, sweep with tombstones, cleanup, progress).

May import: `cargohold.coordinator` and below. Not `cargohold.replication` (a sibling) nor
`cargohold.node`."""
