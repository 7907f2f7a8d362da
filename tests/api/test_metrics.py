"""`/metrics` of a real node (on both servers): the Prometheus text format, parsed by
prometheus_client's own parser; request latency per route and method; invented methods
bucketed; the figures other components own exposed with their types."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from cargohold.node.metrics import KNOWN_METHODS, OTHER_METHOD
from tests.support.oci import push_blob, random_bytes, raw_request
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def cargohold_only(node):
    if node.runtime == "external":
        pytest.skip("cargohold's own metrics")


async def scrape(client) -> dict:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict, name: str, suffix: str = "", **labels) -> float:
    """The sum of the samples of `name + suffix` whose labels include `labels` (0 if none)."""
    family = families.get(name)
    return sum(s.value for s in (family.samples if family else [])
               if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_latency_histogram_counts_each_request_by_route_and_method(client, repo):
    before = await scrape(client)
    for tag in ("a", "b", "c"):
        assert (await client.get(f"/v2/{repo}/manifests/{tag}")).status_code == 404
    after = await scrape(client)
    name = "cargohold_http_request_duration_seconds"
    assert after[name].type == "histogram"
    labels = {"route": "manifest", "method": "GET"}
    assert value(after, name, "_count", **labels) - value(before, name, "_count", **labels) == 3
    assert value(after, name, "_bucket", le="+Inf", **labels) == value(after, name, "_count", **labels)
    requests = "cargohold_http_requests"
    assert value(after, requests, "_total", status="404", **labels) - \
        value(before, requests, "_total", status="404", **labels) == 3
    # Route labels are route names, never paths.
    routes = {s.labels["route"] for s in after[requests].samples}
    assert "manifest" in routes and "metrics" in routes and not any("/" in r for r in routes)


async def test_invented_methods_land_in_one_label_value(node, client):
    before = await scrape(client)
    status, _, _ = await anyio.to_thread.run_sync(raw_request, node.url, "PROPFIND", "/v2/")
    assert status == 405
    # A method no HTTP parser knows: the server may refuse it before the app sees it.
    await anyio.to_thread.run_sync(raw_request, node.url, "BREW", "/v2/")
    after = await scrape(client)
    requests = "cargohold_http_requests"
    assert value(after, requests, "_total", route="base", method=OTHER_METHOD) - \
        value(before, requests, "_total", route="base", method=OTHER_METHOD) >= 1
    assert {s.labels["method"] for s in after[requests].samples} <= KNOWN_METHODS | {OTHER_METHOD}


async def test_replication_etcd_and_holdings_figures_on_a_real_node(client, repo):
    data = random_bytes(10_000, seed=repo)
    await push_blob(client, repo, data)

    async def held() -> dict:
        families = await scrape(client)
        return families if value(families, "cargohold_blobs_held_bytes") >= len(data) else {}

    families = await eventually(held, what="the pushed blob counted as held")
    types = {name: family.type for name, family in families.items()}
    assert types["cargohold_blobs_held"] == types["cargohold_blobs_held_bytes"] == "gauge"
    assert value(families, "cargohold_blobs_held") >= 1
    assert types["cargohold_read_model_revision"] == "gauge"
    assert value(families, "cargohold_read_model_revision") > 0
    assert types["cargohold_etcd_request_duration_seconds"] == "histogram"
    etcd_requests = value(families, "cargohold_etcd_request_duration_seconds", "_count")
    # the keepalives of the membership lease are counted, apart and within all etcd requests
    assert 1 <= value(families, "cargohold_etcd_lease_refreshes", "_total") < etcd_requests
    for counter in ("cargohold_replication_fetched_bytes", "cargohold_replication_copies_made",
                    "cargohold_replication_failures", "cargohold_remote_reads"):
        assert types[counter] == "counter", counter
    for gauge in ("cargohold_replication_queue_depth", "cargohold_replication_in_flight",
                  "cargohold_replication_pending_blobs", "cargohold_replication_lag_seconds"):
        assert types[gauge] == "gauge", gauge
    assert value(families, "cargohold_http_received_bytes", "_total", route="uploads") >= len(data)
    assert types["process_resident_memory_bytes"] == "gauge"


def readme_metrics() -> dict[str, str]:
    """name -> type, from the table of README.md's Metrics section."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(cargohold_\w+)` \| (\w+) \|", section, re.M))


async def test_the_readme_documents_every_metric_with_its_type(client):
    documented = readme_metrics()
    exposed = {name + ("_total" if family.type == "counter" else ""): family.type
               for name, family in (await scrape(client)).items() if name.startswith("cargohold_")}
    assert exposed.items() <= documented.items()
    # The GC figures appear once a GC run exists; every other one is always there.
    missing = {name for name in documented if name not in exposed and not name.startswith("cargohold_gc_")}
    assert missing == set()
