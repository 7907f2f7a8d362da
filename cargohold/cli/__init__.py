"""The `cargohold` command line (a contract: see DESIGN.md): `main` builds the parser, one
module per command group (`nodes`, `gc`, `replication`, `access`), shared options in `options`.

May import: every other package; nothing imports it."""
