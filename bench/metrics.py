"""Prometheus text from cargohold nodes and etcd: parsing, and every metric name the bench reads.

The product's metric names may change; they are read here and nowhere else, so a rename is a
one-line edit below."""

from __future__ import annotations

import re

import httpx

# cargohold node (`GET /metrics`)
BLOBS_HELD = "cargohold_blobs_held"                       # blobs this node holds a copy of
BLOBS_HELD_BYTES = "cargohold_blobs_held_bytes"
QUEUE_DEPTH = "cargohold_replication_queue_depth"
BYTES_FETCHED = "cargohold_replication_fetched_bytes_total"
ETCD_REQUESTS = "cargohold_etcd_request_duration_seconds_count"   # a histogram's count ...
ETCD_REQUEST_SECONDS = "cargohold_etcd_request_duration_seconds_sum"  # ... and its sum
LEASE_REFRESHES = "cargohold_etcd_lease_refreshes_total"
READ_MODEL_REVISION = "cargohold_read_model_revision"
HTTP_REQUESTS = "cargohold_http_requests_total"            # {route, method, status}
HTTP_BYTES_SENT = "cargohold_http_sent_bytes_total"        # {route}

# etcd (`GET /metrics` on its client URL)
ETCD_REVISION = "etcd_debugging_mvcc_current_revision"
ETCD_RPCS = "grpc_server_handled_total"                    # {grpc_type, grpc_method}
ETCD_DB_BYTES = "etcd_mvcc_db_total_size_in_bytes"
ETCD_SLOW_APPLIES = "etcd_server_slow_apply_total"
ETCD_LEADER_CHANGES = "etcd_server_leader_changes_seen_total"

Samples = dict[tuple[str, frozenset], float]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """{(name, frozenset(labels.items())): value} for every sample line."""
    out: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line) if line and not line.startswith("#") else None
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
        except ValueError:
            continue
    return out


def scrape(url: str, client: httpx.Client | None = None) -> Samples:
    """The samples of `url + /metrics`."""
    get = client.get if client is not None else httpx.get
    return parse(get(url + "/metrics", timeout=10.0).text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def etcd_rpc_counts(samples: Samples) -> dict[str, int]:
    """Unary gRPC calls etcd completed, by method (all codes)."""
    out: dict[str, int] = {}
    for (name, labels), v in samples.items():
        d = dict(labels)
        if name == ETCD_RPCS and v and d.get("grpc_type") == "unary":
            out[d["grpc_method"]] = out.get(d["grpc_method"], 0) + int(v)
    return out
