"""The Prometheus metrics of one node, through `prometheus_client`.

Two kinds of figures:

* what the HTTP layer observes per request (`Metrics.observe`): a latency histogram per route
  and method, request counts per route, method and status, body bytes in and out per route;
* figures other components own (etcd requests, replication, GC progress, holdings, the read
  model's revision), read at scrape time by `NodeFigures`, so those components keep plain
  counters and know nothing of Prometheus.

Every node has its own `CollectorRegistry`, never the process-global one: a test may run
several nodes' apps in one process, and each app must expose only its own series.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.pullthrough.figures import CacheFigures
from cargohold.runtime.durations import DurationHistogram

# `_created` series double the output and no dashboard reads them. (Process-wide; a node
# process has no other prometheus_client user.)
disable_created_metrics()

# Seconds, from a manifest GET answered from memory (well under a millisecond) to a
# multi-gigabyte blob streamed in or out over a minute.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Any other method is counted as "other", so invented methods cannot create series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()


class _RouteSeries:
    """The children of one (route, method, status), looked up once: `labels()` takes a lock and
    builds tuples, too slow to repeat on every manifest GET."""

    __slots__ = ("latency", "requests", "sent", "received")

    def __init__(self, metrics: "Metrics", route: str, method: str, status: int):
        self.latency = metrics.latency.labels(route, method)
        self.requests = metrics.requests.labels(route, method, str(status))
        self.sent = metrics.sent.labels(route)
        self.received = metrics.received.labels(route)


class Metrics:
    def __init__(self, *figures: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "cargohold_http_request_duration_seconds",
            "Time from the request's arrival to the last byte of the answer, by route and method.",
            ("route", "method"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("cargohold_http_requests", "HTTP requests answered, by route, method and status.",
                                ("route", "method", "status"), registry=self.registry)
        self.sent = Counter("cargohold_http_sent_bytes", "Response body bytes sent, by route.",
                            ("route",), registry=self.registry)
        self.received = Counter("cargohold_http_received_bytes", "Request body bytes received, by route.",
                                ("route",), registry=self.registry)
        self._series: dict[tuple[str, str, int], _RouteSeries] = {}
        ProcessCollector(registry=self.registry)
        for collector in figures:
            self.registry.register(collector)

    def observe(self, route: str, method: str, status: int, seconds: float, sent: int, received: int) -> None:
        """One answered request (the HTTP hot path: a dict lookup and four child updates)."""
        method = method if method in KNOWN_METHODS else OTHER_METHOD
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _RouteSeries(self, route, method, status)
        series.latency.observe(seconds)
        series.requests.inc()
        if sent:
            series.sent.inc(sent)
        if received:
            series.received.inc(received)

    def render(self) -> bytes:
        """The Prometheus text exposition (serve it with `CONTENT_TYPE`)."""
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------- scrape-time figures

@dataclass(frozen=True)
class SiteRuleLag:
    site: str
    rule: str
    pending: int             # blobs the rule sends to the site that it holds no copy of yet
    lag_seconds: float       # age of the oldest of them


@dataclass(frozen=True)
class ReplicationFigures:
    """This node's replication and GC-sweep counters, as plain numbers (read at scrape time)."""
    queued: int = 0               # blobs waiting to be reconciled on this node
    in_flight: int = 0            # copies being made now
    fetched_bytes: int = 0        # counters from here on: since the node started
    copies_made: int = 0
    copies_dropped: int = 0
    copies_deleted: int = 0
    orphans_removed: int = 0
    failures: int = 0
    remote_reads: int = 0
    sites: Sequence[SiteRuleLag] = field(default_factory=tuple)


class NodeFigures(Collector):
    """Reads the figures other components own when /metrics is scraped."""

    def __init__(self, *, etcd: EtcdClient, metadata: ClusterMetadata, node_id: str,
                 replication: Callable[[], ReplicationFigures]):
        self.etcd = etcd
        self.metadata = metadata
        self.node_id = node_id
        self.replication = replication

    def collect(self) -> Iterator[Metric]:
        yield from self._holdings()
        yield from self._read_model()
        yield from self._etcd()
        yield from _replication(self.replication())
        yield from _gc(self.metadata.gc_runs().values())

    def _holdings(self) -> Iterator[Metric]:
        count = size = 0
        for state in self.metadata.blob_states().values():
            if self.node_id in state.nodes and state.record is not None:
                count += 1
                size += state.record.size
        yield GaugeMetricFamily("cargohold_blobs_held", "Blobs this node holds a copy of.", count)
        yield GaugeMetricFamily("cargohold_blobs_held_bytes", "Size of the blobs this node holds a copy of.", size)

    def _read_model(self) -> Iterator[Metric]:
        metadata = self.metadata
        yield GaugeMetricFamily("cargohold_read_model_revision", "etcd revision the read model has applied.",
                                metadata.revision())
        yield GaugeMetricFamily("cargohold_read_model_staleness_seconds",
                                "Seconds since etcd last answered this node while it does not answer "
                                "(0 while it does): how far behind tags and listings may be.",
                                metadata.staleness())
        yield CounterMetricFamily("cargohold_read_model_loads",
                                  "Full reads of the cluster state (start-up, compacted watch).",
                                  metadata.snapshot_loads)
        holds = metadata.holds
        for name, help_text, value in (
            ("cargohold_hold_refreshes", "GC hold refreshes done for pulls, in the background.", holds.refreshed),
            ("cargohold_hold_refresh_failures", "GC hold refreshes etcd did not take (best effort).", holds.failed),
            ("cargohold_hold_refreshes_dropped", "GC hold refreshes not queued: the backlog was full.",
             holds.dropped),
        ):
            yield CounterMetricFamily(name, help_text, value)

    def _etcd(self) -> Iterator[Metric]:
        yield _histogram("cargohold_etcd_request_duration_seconds",
                         "etcd unary round trips made by this node (retries included) and their duration.",
                         self.etcd.request_durations)
        yield CounterMetricFamily("cargohold_etcd_lease_refreshes",
                                  "Lease keepalive round trips (counted within the etcd requests).",
                                  self.etcd.lease_refreshes)
        yield GaugeMetricFamily("cargohold_etcd_reachable",
                                "1 while etcd answers this node, 0 from its first unanswered request on.",
                                int(self.etcd.health.reachable))
        yield CounterMetricFamily("cargohold_etcd_outages",
                                  "Times etcd stopped answering this node for long enough that requests "
                                  "needing it fail at once.", self.etcd.health.outages)


def _histogram(name: str, help_text: str, durations: DurationHistogram) -> HistogramMetricFamily:
    buckets = [(floatToGoString(bound), count) for bound, count in durations.cumulative()]
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=durations.sum)


def _replication(stats: ReplicationFigures) -> Iterator[Metric]:
    yield GaugeMetricFamily("cargohold_replication_queue_depth", "Blobs waiting to be reconciled.", stats.queued)
    yield GaugeMetricFamily("cargohold_replication_in_flight", "Blob copies being made now.", stats.in_flight)
    for name, help_text, value in (
        ("cargohold_replication_fetched_bytes", "Bytes copied from peers.", stats.fetched_bytes),
        ("cargohold_replication_copies_made", "Copies this node made and published.", stats.copies_made),
        ("cargohold_replication_copies_dropped", "Copies this node dropped (no longer an owner).",
         stats.copies_dropped),
        ("cargohold_replication_copies_deleted", "Copies this node deleted after garbage collection.",
         stats.copies_deleted),
        ("cargohold_replication_orphans_removed", "Local files no etcd record accounted for, removed by scrubs.",
         stats.orphans_removed),
        ("cargohold_replication_failures", "Copy attempts that failed.", stats.failures),
        ("cargohold_remote_reads", "Blob reads served by streaming from a peer (no local copy).", stats.remote_reads),
    ):
        yield CounterMetricFamily(name, help_text, value)
    pending = GaugeMetricFamily("cargohold_replication_pending_blobs",
                                "Blobs a replication rule sends to a site that has no copy yet.",
                                labels=("site", "rule"))
    lag = GaugeMetricFamily("cargohold_replication_lag_seconds",
                            "Age of the oldest blob a site still lacks, per site and rule.", labels=("site", "rule"))
    for row in stats.sites:
        pending.add_metric((row.site, row.rule), row.pending)
        lag.add_metric((row.site, row.rule), row.lag_seconds)
    yield pending
    yield lag


GC_RUN_FIGURES = (
    ("marked", "cargohold_gc_last_run_marked", "Blobs the latest GC run marked as referenced."),
    ("candidates", "cargohold_gc_last_run_candidates", "Blobs the latest GC run found unreferenced."),
    ("swept", "cargohold_gc_last_run_swept", "Blobs the latest GC run deleted."),
    ("bytes_freed", "cargohold_gc_last_run_freed_bytes", "Bytes the latest GC run freed."),
    ("manifests_deleted", "cargohold_gc_last_run_deleted_manifests", "Manifests the latest GC run deleted."),
    ("tags_deleted", "cargohold_gc_last_run_deleted_tags", "Tags the latest GC run deleted (retention)."),
)


def _gc(runs: Iterable[dict]) -> Iterator[Metric]:
    """The latest run's progress: gauges (a new run starts again from 0), no run id in their
    labels (a label per run would leave a new series behind every run); the id is in `_info`."""
    latest = max(runs, key=lambda run: run.get("requested", 0), default=None)
    if latest is None:
        return
    info = GaugeMetricFamily("cargohold_gc_last_run_info", "The latest GC run: its id and state (value 1).",
                             labels=("run", "state"))
    info.add_metric((str(latest.get("id", "")), str(latest.get("state", ""))), 1)
    yield info
    for key, name, help_text in GC_RUN_FIGURES:
        yield GaugeMetricFamily(name, help_text, latest.get(key, 0))


class PullThroughFigures(Collector):
    """The pull-through cache's counters (`pullthrough.figures`), per remote repository."""

    def __init__(self, figures: CacheFigures):
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("cargohold_pullthrough_requests",
                                       "Manifest and blob requests of remote repositories, by how the cache "
                                       "answered (hit, miss, revalidated, stale, error).", labels=("repository", "result"))
        upstream = CounterMetricFamily("cargohold_pullthrough_upstream_requests",
                                       "Calls to upstream registries, by method and outcome.",
                                       labels=("repository", "method", "outcome"))
        received = CounterMetricFamily("cargohold_pullthrough_upstream_bytes", "Bytes received from upstreams.",
                                       labels=("repository",))
        fills = CounterMetricFamily("cargohold_pullthrough_fills",
                                    "Blob fills from upstreams, by outcome (filled, joined, followed, mismatch, failed).",
                                    labels=("repository", "outcome"))
        for name, figures in list(self.figures.repositories.items()):
            for result, count in figures.requests.items():
                requests.add_metric((name, result), count)
            for (method, outcome), count in figures.upstream_requests.items():
                upstream.add_metric((name, method, outcome), count)
            received.add_metric((name,), figures.upstream_bytes)
            for outcome, count in figures.fills.items():
                fills.add_metric((name, outcome), count)
        yield from (requests, upstream, received, fills)
