"""What the cluster commands share: an etcd client from --etcd, a loaded snapshot, a rules file."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import yaml

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata

T = TypeVar("T")


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
