"""What the cluster commands share: the cluster-options block (`--etcd`, `--data-dir`,
`--etcd-ca/cert/key`, `--cluster`, `--json`) and `cluster_command`, which attaches it; running a
command against etcd; an etcd client and a loaded snapshot; reading a rules file; printing
reports, tables and progress lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import yaml

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata

T = TypeVar("T")
Command = Callable[[argparse.Namespace], Awaitable[int]]


def cluster_command(p: argparse.ArgumentParser, command: Command) -> argparse.ArgumentParser:
    """Give `p` the cluster options and run `command` (an async function of the parsed
    arguments) against the cluster's etcd. The options appear in `--help` where this is called."""
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
    p.set_defaults(handler=lambda args: with_etcd(args, command))
    return p


def with_etcd(args: argparse.Namespace, command: Command) -> int:
    """Run `command` on trio, against --etcd or else the private etcd of the node under --data-dir."""
    import anyio

    if not args.etcd:
        from cargohold.coordinator.embedded import private_etcd_url

        args.etcd = private_etcd_url(args.data_dir)
    if not args.etcd:
        print(f"cargohold: give --etcd (or CARGOHOLD_ETCD); no private etcd under {args.data_dir}", file=sys.stderr)
        return 2
    return anyio.run(command, args, backend="trio")


def etcd_client(args) -> EtcdClient:
    return EtcdClient([e.strip() for e in args.etcd.split(",") if e.strip()],
                      ca_file=getattr(args, "etcd_ca", None), cert_file=getattr(args, "etcd_cert", None),
                      key_file=getattr(args, "etcd_key", None))


async def load_metadata(args) -> ClusterMetadata:
    """The cluster's state at one revision (for commands that only read)."""
    async with etcd_client(args) as client:
        metadata = ClusterMetadata(client, args.cluster, node_id="cli")
        await metadata.load()
    return metadata


def read_rules_file(path: str, parse: Callable[[object], T], errors: tuple[type[Exception], ...]) -> T | None:
    """Parse a YAML or JSON rules file; prints the reason and returns None when it is not valid."""
    try:
        with open(path) as f:
            return parse(yaml.safe_load(f))
    except (OSError, yaml.YAMLError, *errors) as exc:
        print(f"cargohold: {path}: {exc}", file=sys.stderr)
        return None


def print_rules(args, rules, lines: list[str]) -> None:
    """A stored rules document: as JSON with --json, else one line per rule."""
    if args.json:
        print(rules.encode().decode())
    elif lines:
        print("\n".join(lines))


def report(args, document: dict, text: str) -> None:
    """One result: a JSON line with --json, else a sentence."""
    print(json.dumps(document) if args.json else text)


def fail(message: str, code: int = 1) -> int:
    """Say why on stderr; returns the exit code."""
    print(f"cargohold: {message}", file=sys.stderr)
    return code


def print_table(table: list[tuple]) -> None:
    """Rows of strings (the first is the header) in left-aligned columns."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = min(width, int(width * done / max(total, 1)))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


def show_progress(line: str) -> None:
    """A progress line on stderr: redrawn in place on a terminal, one line each otherwise."""
    sys.stderr.write(("\r" + line) if sys.stderr.isatty() else (line + "\n"))
    sys.stderr.flush()


def end_progress() -> None:
    """Finish the line `show_progress` redraws on a terminal."""
    if sys.stderr.isatty():
        sys.stderr.write("\n")
