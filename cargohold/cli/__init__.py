"""The `cargohold` command line (a contract: see DESIGN.md): `main` assembles the parser from one
module per command group (`serve`, `nodes`, `access`, `gc`, `replication`, `repos`), each registering its
own subcommands; `options` holds what they share (the cluster options, running against etcd,
reports, tables, progress lines, rules files). No module takes a private name from another.

May import: every other package; nothing imports it."""
