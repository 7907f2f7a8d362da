"""Content-addressed bytes on this node's disk: the `BlobStore` protocol, the filesystem store
(temp file, fsync, verify, rename), staging of incoming bytes, and hashing helpers. Nothing is
ever visible under a digest unless its bytes hash to that digest.

May import: `cargohold.oci` and below (`runtime`, `units`, `config`)."""
