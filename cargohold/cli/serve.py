"""`cargohold serve`: run one registry node with settings from a config file, the environment
(`CARGOHOLD_<SETTING>`) and flags (flags win)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cargohold import config
from cargohold.runtime import logs


def register(sub) -> None:
    """Add `serve` to the top-level subparsers."""
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
    p.add_argument("--grpc-insecure", action="store_true", default=None,
                   help="DANGEROUS: serve gRPC to callers without the cluster's peer credential "
                        "(only on a loopback address or with mutual TLS; for debugging)")
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
