"""The metrics of one node, without a node: what `Metrics.observe` records and how the
scrape-time figures are exposed (names, types, labels), checked through prometheus_client's
own parser of the text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cargohold.node.metrics import (
    LATENCY_BUCKETS, Metrics, ReplicationFigures, SiteRuleLag, _gc, _histogram, _replication,
)
from cargohold.runtime.durations import DurationHistogram


def families(text: bytes | str) -> dict:
    text = text.decode() if isinstance(text, bytes) else text
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(family, suffix: str = "", **labels) -> float:
    matching = [s.value for s in family.samples
                if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (family.name + suffix, labels, family.samples)
    return matching[0]


def test_duration_histogram_buckets_are_upper_inclusive_and_cumulative():
    durations = DurationHistogram((0.1, 0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.5):
        durations.observe(seconds)
    assert durations.cumulative() == [(0.001, 2), (0.01, 3), (0.1, 3), (float("inf"), 4)]
    assert durations.count == 4
    assert abs(durations.sum - 0.5035) < 1e-12


def test_requests_are_counted_per_route_method_and_status_with_latency_per_route_and_method():
    metrics = Metrics()
    metrics.observe("manifest", "GET", 200, 0.0003, 1200, 0)
    metrics.observe("manifest", "GET", 404, 0.0002, 150, 0)
    metrics.observe("blob", "PUT", 201, 2.0, 0, 5_000_000)
    found = families(metrics.render())

    latency = found["cargohold_http_request_duration_seconds"]
    assert latency.type == "histogram"
    assert sample(latency, "_count", route="manifest", method="GET") == 2
    assert sample(latency, "_bucket", route="manifest", method="GET", le="0.00025") == 1
    assert sample(latency, "_bucket", route="manifest", method="GET", le="0.0005") == 2
    assert sample(latency, "_bucket", route="blob", method="PUT", le="1.0") == 0
    assert sample(latency, "_bucket", route="blob", method="PUT", le="2.5") == 1
    assert len([s for s in latency.samples if s.name.endswith("_bucket")]) == 2 * (len(LATENCY_BUCKETS) + 1)

    requests = found["cargohold_http_requests"]
    assert requests.type == "counter"
    assert sample(requests, "_total", route="manifest", method="GET", status="404") == 1
    assert sample(found["cargohold_http_sent_bytes"], "_total", route="manifest") == 1350
    assert sample(found["cargohold_http_received_bytes"], "_total", route="blob") == 5_000_000
    assert not [name for name in found if name.endswith("_created")]


def test_invented_methods_share_one_label_value():
    metrics = Metrics()
    for method in ("BREW", "PROPFIND", "X" * 200, "GET"):
        metrics.observe("other", method, 405, 0.0001, 0, 0)
    requests = families(metrics.render())["cargohold_http_requests"]
    assert {s.labels["method"] for s in requests.samples} == {"other", "GET"}
    assert sample(requests, "_total", route="other", method="other", status="405") == 3


def test_each_node_has_its_own_registry():
    first, second = Metrics(), Metrics()     # no "Duplicated timeseries" error
    first.observe("blob", "GET", 200, 0.01, 10, 0)
    assert "cargohold_http_requests_total{" not in second.render().decode()


def test_durations_become_a_prometheus_histogram():
    durations = DurationHistogram((0.001, 0.01))
    durations.observe(0.0005)
    durations.observe(0.005)
    durations.observe(3.0)
    family = _histogram("cargohold_etcd_request_duration_seconds", "etcd round trips.", durations)
    exposed = families(_render(family))["cargohold_etcd_request_duration_seconds"]
    assert exposed.type == "histogram"
    assert sample(exposed, "_bucket", le="0.001") == 1
    assert sample(exposed, "_bucket", le="+Inf") == 3
    assert sample(exposed, "_count") == 3
    assert abs(sample(exposed, "_sum") - 3.0055) < 1e-9


def test_replication_figures_are_counters_and_gauges_with_units_in_names():
    figures = ReplicationFigures(queued=7, in_flight=1, copies_made=5, fetched_bytes=4096, remote_reads=3,
                                 sites=[SiteRuleLag("eu", "* -> *", 4, 12.5)])
    found = families(_render(*_replication(figures)))
    assert found["cargohold_replication_fetched_bytes"].type == "counter"
    assert sample(found["cargohold_replication_fetched_bytes"], "_total") == 4096
    assert sample(found["cargohold_replication_copies_made"], "_total") == 5
    assert sample(found["cargohold_remote_reads"], "_total") == 3
    assert found["cargohold_replication_queue_depth"].type == "gauge"
    assert sample(found["cargohold_replication_queue_depth"]) == 7
    assert sample(found["cargohold_replication_pending_blobs"], site="eu", rule="* -> *") == 4
    assert sample(found["cargohold_replication_lag_seconds"], site="eu", rule="* -> *") == 12.5


def test_gc_figures_are_the_latest_runs_without_a_series_per_run():
    runs = [{"id": "old", "state": "done", "requested": 1.0, "swept": 9},
            {"id": "new", "state": "running", "requested": 2.0, "marked": 3, "bytes_freed": 2048}]
    found = families(_render(*_gc(runs)))
    assert sample(found["cargohold_gc_last_run_info"], run="new", state="running") == 1
    assert sample(found["cargohold_gc_last_run_freed_bytes"]) == 2048
    assert sample(found["cargohold_gc_last_run_swept"]) == 0
    assert all(set(s.labels) <= {"run", "state"} for f in found.values() for s in f.samples)
    assert list(_gc([])) == []


def _render(*metric_families) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self):
            return metric_families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    return generate_latest(registry)
