"""The fill engine's pure parts: what readers may have of a blob still being verified, how
upstream chunks are batched, the claim record, and how a failed fill's verdict travels to the
nodes that waited for it."""

from __future__ import annotations

import anyio
import pytest

from cargohold.coordinator.fills import FillClaim
from cargohold.pullthrough.fill import error_for
from cargohold.pullthrough.staging import batches, releasable
from cargohold.upstream.errors import (
    DigestMismatch, UpstreamDenied, UpstreamNotFound, UpstreamRateLimited, UpstreamUnavailable, outcome_label,
)


@pytest.mark.parametrize("written, size, verified, expected", [
    (0, 10, False, 0),
    (4, 10, False, 4),
    (9, 10, False, 9),
    (10, 10, False, 9),     # the whole body is there: its last byte waits for the digest check
    (10, 10, True, 10),
    (0, 0, False, 0),       # the empty blob: nothing to hold back, nothing to give
    (0, 0, True, 0),
    (1, 1, False, 0),
])
def test_the_last_byte_is_released_only_after_verification(written, size, verified, expected):
    assert releasable(written, size, verified) == expected


def test_chunks_are_batched_without_losing_or_reordering_bytes():
    chunks = [bytes([i]) * n for i, n in enumerate([3, 5, 1, 7, 2, 9])]

    async def collect():
        async def source():
            for chunk in chunks:
                yield chunk
        return [piece async for piece in batches(source(), batch=8)]

    joined = anyio.run(collect)
    assert b"".join(joined) == b"".join(chunks)
    assert [len(piece) for piece in joined] == [8, 8, 11]


def test_a_claim_record_round_trips_and_leaves_out_what_is_unset():
    claim = FillClaim("n1", "hub/library/alpine", 1700000000.5)
    assert FillClaim.decode(claim.encode()) == claim
    assert b"failed" not in claim.encode()
    failed = FillClaim("n2", "hub/x", 1.0, "mismatch", "bytes hash to sha256:abc")
    assert FillClaim.decode(failed.encode()) == failed


@pytest.mark.parametrize("error", [
    UpstreamNotFound("404"), UpstreamDenied("403"), UpstreamUnavailable("refused"), DigestMismatch("wrong"),
    UpstreamRateLimited("429", 30.0),
])
def test_a_waiter_raises_the_kind_of_error_the_filler_met(error):
    claim = FillClaim("n1", "hub/x", 1.0, outcome_label(error), str(error))
    raised = error_for(claim)
    assert type(raised) is type(error)
    assert "n1" in str(raised) and str(error) in str(raised)


def test_an_unknown_verdict_is_reported_as_unavailable():
    raised = error_for(FillClaim("n1", "hub/x", 1.0, "error", "etcd went away"))
    assert type(raised) is UpstreamUnavailable


def test_many_fills_at_once_share_one_memory_budget_for_their_readers():
    from cargohold.pullthrough import staging

    saved = staging.GrowingFile.live
    try:
        staging.GrowingFile.live = 1
        assert staging.GrowingFile.recent_window() == staging.RECENT_BYTES
        staging.GrowingFile.live = staging.RECENT_BUDGET // staging.RECENT_BYTES * 4
        assert staging.GrowingFile.recent_window() == staging.RECENT_BYTES // 4
        staging.GrowingFile.live = 100_000
        assert staging.GrowingFile.recent_window() == staging.WRITE_BATCH      # never less than a batch
    finally:
        staging.GrowingFile.live = saved
