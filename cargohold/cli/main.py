"""The `cargohold` command line (DESIGN.md, "The command line": a contract)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cargohold import __version__, config
from cargohold.cli import access as authcmd
from cargohold.cli import gc as gccmd
from cargohold.runtime import logs
from cargohold.cli import nodes as nodecmd
from cargohold.cli import replication as replcmd


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run a registry node")
    p.add_argument("--config", type=Path, help="YAML or TOML settings file")
    p.add_argument("--listen", help="HTTP address HOST:PORT (default 127.0.0.1:5000)")
    p.add_argument("--data-dir", type=Path, help="where blobs and uploads live (default ./data)")
    p.add_argument("--etcd", help="etcd endpoints URL[,URL...]; without it a private etcd is started")
    p.add_argument("--etcd-ca", help="CA bundle for TLS to etcd")
    p.add_argument("--etcd-cert", help="client certificate for TLS to etcd")
    p.add_argument("--etcd-key", help="client key for TLS to etcd")
    p.add_argument("--cluster", help="cluster name (etcd key prefix; default 'default')")
    p.add_argument("--node-id", help="this node's id (default: generated once, kept in the data dir)")
    p.add_argument("--site", help="site (region) of this node (default 'default')")
    p.add_argument("--grpc-listen", help="gRPC address HOST:PORT for peers")
    p.add_argument("--grpc-advertise", help="the HOST:PORT peers dial for gRPC (default: the bound address)")
    p.add_argument("--grpc-tls-cert", help="this node's certificate for mutual TLS between nodes")
    p.add_argument("--grpc-tls-key", help="this node's key for mutual TLS between nodes")
    p.add_argument("--grpc-tls-ca", help="the CA that signs every node's certificate")
    p.add_argument("--advertise-url", help="the URL other nodes and clients reach this node at")
    p.add_argument("--runtime", choices=["asyncio", "trio"], help="asyncio (uvicorn, default) or trio (hypercorn)")
    p.add_argument("--min-copies", type=int, help="copies a blob must have before its upload is acknowledged")
    p.add_argument("--sync-sites", type=int, help="other sites that must hold a push before it is acknowledged")
    p.add_argument("--tls-cert", help="TLS certificate for the HTTP API")
    p.add_argument("--tls-key", help="TLS key for the HTTP API")
    p.add_argument("--log-level", help="debug, info, warning or error")
    p.add_argument("--log-format", choices=["plain", "json"], help="plain (default) or json lines")
    p.add_argument("--auth", choices=["auto", "on", "off"],
                   help="access control: auto (default: on once the cluster has accounts, always on a public address)")
    p.add_argument("--insecure-open", action="store_true", default=None,
                   help="allow serving without access control on a non-loopback address")
    p.add_argument("--htpasswd", help="an htpasswd file (bcrypt) with more users")
    p.add_argument("--token-ttl", type=float, help="lifetime of issued tokens in seconds (default 300)")
    p.add_argument("--audit-log", help="audit log file, or - for stdout")
    p.add_argument("--login-rate", help="failed logins allowed per account, N/SECONDS (default 10/300)")
    p.add_argument("--login-rate-client", help="failed logins allowed per client address, N/SECONDS (default 30/60)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import anyio

    from cargohold.runtime import memory
    from cargohold.node.server import serve

    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "config", "command")}
    try:
        settings = config.load(args.config, flags)
    except (config.ConfigError, OSError) as exc:
        print(f"cargohold: {exc}", file=sys.stderr)
        return 2
    node_id = config.resolve_node_id(settings)
    logs.configure(settings.log_level, settings.log_format, node_id, settings.access_log)
    memory.keep_large_buffers()
    try:
        if settings.runtime == "trio":
            anyio.run(serve, settings, backend="trio")
        else:
            anyio.run(serve, settings, backend="asyncio", backend_options={"use_uvloop": True})
    except config.ConfigError as exc:    # found at start-up, e.g. an open registry on a public address
        print(f"cargohold: {exc}", file=sys.stderr)
        return 2
    return 0


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", default=os.environ.get("CARGOHOLD_ETCD"),
                   help="etcd endpoints URL[,URL...] (env CARGOHOLD_ETCD); default: the private etcd "
                        "of a single node under --data-dir")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CARGOHOLD_DATA_DIR", "./data")),
                   help="a single node's data dir, to find its private etcd (default ./data)")
    p.add_argument("--etcd-ca", default=os.environ.get("CARGOHOLD_ETCD_CA"), help="CA bundle for TLS to etcd")
    p.add_argument("--etcd-cert", default=os.environ.get("CARGOHOLD_ETCD_CERT"), help="client certificate for etcd")
    p.add_argument("--etcd-key", default=os.environ.get("CARGOHOLD_ETCD_KEY"), help="client key for etcd")
    p.add_argument("--cluster", default=os.environ.get("CARGOHOLD_CLUSTER", "default"),
                   help="cluster name (env CARGOHOLD_CLUSTER; default 'default')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _node_parser(sub) -> None:
    node = sub.add_parser("node", help="cluster members: list, join, leave")
    actions = node.add_subparsers(dest="action", required=True)
    p = actions.add_parser("list", help="members: id, site, state, URL, alive, blobs held, bytes")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, nodecmd.node_list))
    p = actions.add_parser("join", help="admit a new node, or re-activate one that left")
    p.add_argument("node_id")
    p.add_argument("--site", default="default", help="site of a node not seen before")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, nodecmd.node_join))
    p = actions.add_parser("leave", help="drain a node: its blobs are copied elsewhere, then it is removed")
    p.add_argument("node_id")
    p.add_argument("--wait", action="store_true", help="wait until the node has left, showing progress")
    p.add_argument("--replicas", type=int, default=2, help="the cluster's replicas_per_site (default 2)")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, nodecmd.node_leave))


def _gc_parser(sub) -> None:
    gc = sub.add_parser("gc", help="garbage collection: run, status")
    actions = gc.add_subparsers(dest="action", required=True)
    p = actions.add_parser("run", help="one cluster-wide mark-and-sweep (online: pushes go on)")
    p.add_argument("--dry-run", action="store_true", help="report what would be freed; free nothing")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish, showing progress")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, gccmd.gc_run))
    p = actions.add_parser("status", help="the leader and the latest run's progress")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, gccmd.gc_status))


def _retention_parser(sub) -> None:
    retention = sub.add_parser("retention", help="retention and immutable-tag rules")
    rules = retention.add_subparsers(dest="what", required=True).add_parser("rules", help="the rules")
    actions = rules.add_subparsers(dest="action", required=True)
    p = actions.add_parser("set", help="store the rules file (YAML or JSON: retention: [...], immutable: [...])")
    p.add_argument("file")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, gccmd.retention_set))
    p = actions.add_parser("list", help="show the stored rules")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, gccmd.retention_list))


def _replication_parser(sub) -> None:
    replication = sub.add_parser("replication", help="which repositories reach which sites, and progress")
    actions = replication.add_subparsers(dest="what", required=True)
    rules = actions.add_parser("rules", help="replication rules").add_subparsers(dest="action", required=True)
    p = rules.add_parser("set", help="store the rules file (YAML or JSON: replication: [{repositories, sites}])")
    p.add_argument("file")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, replcmd.rules_set))
    p = rules.add_parser("list", help="show the stored rules")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, replcmd.rules_list))
    p = actions.add_parser("status", help="per site and rule: pending, lag, in flight, failures, bytes/s")
    _cluster_options(p)
    p.set_defaults(handler=lambda a: _with_etcd(a, replcmd.status))


def _with_etcd(args: argparse.Namespace, command) -> int:
    import anyio

    if not args.etcd:
        from cargohold.coordinator.embedded import private_etcd_url

        args.etcd = private_etcd_url(args.data_dir)
    if not args.etcd:
        print(f"cargohold: give --etcd (or CARGOHOLD_ETCD); no private etcd under {args.data_dir}", file=sys.stderr)
        return 2
    return anyio.run(command, args, backend="trio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cargohold", description="A clustered OCI container image registry.")
    parser.add_argument("--version", action="version", version=f"cargohold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _node_parser(sub)
    authcmd.register(sub)
    _gc_parser(sub)
    _retention_parser(sub)
    _replication_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
