"""The `cargohold` command line (DESIGN.md, "The command line": a contract): one parser
assembled from the command groups, each of which registers its own subcommands."""

from __future__ import annotations

import argparse

from cargohold import __version__
from cargohold.cli import access, gc, nodes, replication, repos, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cargohold", description="A clustered OCI container image registry.")
    parser.add_argument("--version", action="version", version=f"cargohold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (serve, nodes, access, gc, replication, repos):    # the order `cargohold --help` lists them in
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
