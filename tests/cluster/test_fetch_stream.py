"""The fetch path's stream: one worker thread consumes a holder's whole gRPC stream. Cancelling the
task that awaits it cancels the call and ends the thread at once, also while the thread waits
for a bandwidth limit; the site bandwidth bucket throttles several streams together.

Real gRPC: the replication server and client as the nodes run them, in this process.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import anyio
import pytest

from cargohold.runtime.grpc_bridge import StreamStopped
from cargohold.replication.fetch import TokenBucket
from cargohold.replication.transfer import PeerClient, PeerUnavailable, ReplicationService, grpc_server
from tests.support.poll import PATIENCE

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


class WatchedStop:
    """A fetch's `stopping` event that also says when a thread starts waiting on it (the
    bandwidth bucket waits on it for its tokens)."""

    def __init__(self, stopping: threading.Event, waiting: threading.Event):
        self._stopping, self._waiting = stopping, waiting

    def __getattr__(self, name):
        return getattr(self._stopping, name)

    def wait(self, timeout: float | None = None) -> bool:
        self._waiting.set()
        return self._stopping.wait(timeout)


class TrackedFile:
    """A served blob file that records when the server closes it (its stream has ended), and
    that can stall (a holder whose disk hangs) after some bytes until `resume` is set."""

    def __init__(self, path, closed: threading.Event, stall_after: int | None = None,
                 resume: threading.Event | None = None):
        self._f = open(path, "rb")
        self._closed = closed
        self._stall_after = stall_after
        self._resume = resume

    def __getattr__(self, name):
        return getattr(self._f, name)

    def read(self, size: int = -1) -> bytes:
        if self._stall_after is not None and self._f.tell() >= self._stall_after:
            self._resume.wait(PATIENCE)
        return self._f.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        self._closed.set()


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(24 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data, "sha256:" + hashlib.sha256(data).hexdigest()


async def test_copy_streams_every_chunk_in_order_into_one_thread(blob):
    path, data, digest = blob
    closed = threading.Event()
    service = ReplicationService(lambda d: TrackedFile(path, closed) if d == digest else None, lambda d: True)
    async with grpc_server("127.0.0.1:0", service, keyring=None) as port:
        peers = PeerClient()
        try:
            received, threads = [], set()

            def sink(chunk: bytes, stopping: threading.Event) -> None:
                threads.add(threading.get_ident())
                received.append(chunk)

            await peers.copy(f"127.0.0.1:{port}", digest, 3 * MiB + 5, 0, sink)
            assert b"".join(received) == data[3 * MiB + 5:]
            assert len(threads) == 1 and threading.get_ident() not in threads
            with pytest.raises(PeerUnavailable):
                await peers.copy(f"127.0.0.1:{port}", "sha256:" + "0" * 64, 0, 0, sink)
        finally:
            peers.close()


@pytest.mark.parametrize("blocked_in", ["bandwidth wait", "next message"])
async def test_cancelling_a_copy_cancels_the_grpc_stream_and_ends_its_thread(blob, blocked_in):
    path, data, digest = blob
    closed, resume = threading.Event(), threading.Event()
    stall_after = 2 * MiB if blocked_in == "next message" else None
    service = ReplicationService(lambda d: TrackedFile(path, closed, stall_after, resume), lambda d: True)
    async with grpc_server("127.0.0.1:0", service, keyring=None) as port:
        peers = PeerClient()
        try:
            calls, returned, blocked = [], threading.Event(), threading.Event()
            bucket = TokenBucket(MiB // 64)     # the first 1 MiB chunk alone waits a minute unless cancelled

            def sink(chunk: bytes, stopping: threading.Event) -> None:
                calls.append(len(chunk))
                try:
                    if blocked_in == "bandwidth wait":
                        bucket.take(len(chunk), WatchedStop(stopping, blocked))
                    elif len(calls) == 2:
                        # the holder stalls after 2 MiB: the thread now waits in grpc's
                        # iterator for a message that does not come
                        blocked.set()
                finally:
                    returned.set()

            started = time.monotonic()
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(peers.copy, f"127.0.0.1:{port}", digest, 0, 0, sink)
                    assert await anyio.to_thread.run_sync(blocked.wait, PATIENCE)
                    scope.cancel()
            # The bound is the behaviour: cancelled at once, not after the minute-long wait
            # for tokens or for the stalled holder (generous on purpose).
            elapsed = time.monotonic() - started
            assert elapsed < 20, f"cancelling took {elapsed:.1f}s"
            seen = len(calls)
            assert seen == (2 if stall_after else 1)
            # The thread has returned before copy() did, and nothing is delivered afterwards.
            assert returned.is_set()
            # The server's stream ends (it closes the file) instead of running to the end.
            resume.set()
            assert await anyio.to_thread.run_sync(closed.wait, PATIENCE)
            assert len(calls) == seen
        finally:
            resume.set()
            peers.close()


def test_one_bandwidth_bucket_throttles_several_threads_together():
    bucket = TokenBucket(4 * MiB)           # a burst of 4 MiB, then 4 MiB/s
    stopping = threading.Event()

    def take_four():
        for _ in range(4):
            bucket.take(MiB, stopping)

    started = time.monotonic()
    threads = [threading.Thread(target=take_four) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 12 MiB: 4 MiB of burst, 8 MiB at 4 MiB/s: at least about two seconds, however the threads interleave.
    assert time.monotonic() - started >= 1.8

    stopping.set()
    started = time.monotonic()
    with pytest.raises(StreamStopped):
        bucket.take(240 * MiB, stopping)    # would wait a minute
    # The bound is the behaviour: a stopped fetch does not sit out its wait (generous on purpose).
    assert time.monotonic() - started < 20


async def test_copy_many_streams_whole_blobs_in_order_and_flags_the_ones_not_held(tmp_path):
    """ReadBlobs: each requested blob whole, in the order asked, in one worker thread; a blob
    the holder lacks is one `missing` chunk; a request over the limit or with a bad digest is
    refused as a whole."""
    from cargohold.replication.transfer import MAX_BLOBS_PER_CALL

    blobs = {}
    for size in (3 * MiB + 17, 1, MiB):
        data = os.urandom(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (tmp_path / digest[7:]).write_bytes(data)
        blobs[digest] = data
    absent = "sha256:" + "ab" * 32
    held = list(blobs)
    wanted = [held[0], absent, held[1], held[2]]

    def open_blob(digest):
        path = tmp_path / digest[7:]
        return open(path, "rb") if path.exists() else None

    service = ReplicationService(open_blob, lambda d: d.startswith("sha256:") and len(d) == 71)
    async with grpc_server("127.0.0.1:0", service, keyring=None) as port:
        peers = PeerClient()
        try:
            received: dict[int, list] = {}
            order, threads = [], set()

            def consume(index, offset, data, stopping):
                threads.add(threading.get_ident())
                if not order or order[-1] != index:
                    order.append(index)
                received.setdefault(index, []).append((offset, data))

            await peers.copy_many(f"127.0.0.1:{port}", wanted, consume)
            assert order == [0, 1, 2, 3]
            assert received[1] == [(0, None)]
            for index in (0, 2, 3):
                pieces = received[index]
                assert [offset for offset, _ in pieces] == [sum(len(d) for _, d in pieces[:i]) for i in range(len(pieces))]
                assert b"".join(d for _, d in pieces) == blobs[wanted[index]]
            assert len(threads) == 1 and threading.get_ident() not in threads
            with pytest.raises(PeerUnavailable, match="INVALID_ARGUMENT"):
                await peers.copy_many(f"127.0.0.1:{port}", [held[0]] * (MAX_BLOBS_PER_CALL + 1), consume)
            with pytest.raises(PeerUnavailable, match="INVALID_ARGUMENT"):
                await peers.copy_many(f"127.0.0.1:{port}", [held[0], "sha256:../etc"], consume)
        finally:
            peers.close()
