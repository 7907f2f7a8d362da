"""The replicator's work queue (cargohold.replication.work): no etcd, no peers."""

from __future__ import annotations

import pytest

from cargohold.replication.work import ReconcileQueue

pytestmark = pytest.mark.anyio


async def test_a_full_pass_first_then_only_what_changed():
    queue = ReconcileQueue()
    assert sorted(await queue.next_batch(lambda: ["a", "b"])) == ["a", "b"]    # starts with a full pass
    queue.changed({"b", "c"})
    assert sorted(await queue.next_batch(lambda: ["a", "b", "c"])) == ["c"]    # b is still in progress
    for digest in ("a", "b", "c"):
        queue.done(digest)
    assert queue.idle() is False                  # b changed while in progress: still pending
    assert await queue.next_batch(lambda: []) == ["b"]
    queue.done("b")
    assert queue.idle() and queue.depth() == 0


async def test_a_waiting_manifest_comes_back_when_its_dependency_changes():
    queue = ReconcileQueue()
    await queue.next_batch(lambda: [])
    queue.wait_for("layer", "manifest")
    queue.changed({"layer"})
    assert sorted(await queue.next_batch(lambda: [])) == ["layer", "manifest"]


async def test_failures_are_reported_until_the_blob_succeeds():
    queue = ReconcileQueue()
    queue.failed("a", "peer unavailable")
    queue.failed("a", "peer unavailable again")
    report = queue.report()
    assert report["failed"] == 1 and report["failures"][0]["attempts"] == 2
    assert report["failures"][0]["reason"] == "peer unavailable again"
    queue.succeeded("a")
    assert queue.report()["failed"] == 0
