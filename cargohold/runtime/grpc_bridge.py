"""Bridging grpcio's thread-based calls into anyio tasks (used by coordinator and replication).

grpcio completes futures on its own threads. These helpers wake the waiting task without
blocking those threads, and cancel the grpc call when the waiting task is cancelled, so every
grpc call is async and cancellable from the event loop's point of view.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

import anyio
import anyio.lowlevel


def loop_scheduler() -> Callable[[Callable[[], object]], object]:
    """A non-blocking, thread-safe "run this soon on the current event loop".

    Not ``anyio.from_thread.run_sync``: that blocks the calling thread until the loop ran
    the function, and the caller here is grpc's completion thread, shared by all calls of
    a channel.
    """
    native = anyio.lowlevel.current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return native.call_soon_threadsafe
    return native.run_sync_soon  # trio.lowlevel.TrioToken


async def await_future(future: Any) -> Any:
    """Wait for a grpc (or concurrent.futures) future without blocking the loop."""
    done = anyio.Event()
    schedule = loop_scheduler()

    def on_done(_: Any) -> None:
        try:
            schedule(done.set)
        except RuntimeError:  # the loop has finished (trio.RunFinishedError is one too)
            pass

    future.add_done_callback(on_done)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


async def next_message(call: Any, limiter: anyio.CapacityLimiter | None = None) -> Any:
    """The next message of a streaming call (None at its end), read in a worker thread."""
    try:
        return await anyio.to_thread.run_sync(next, call, None, abandon_on_cancel=True, limiter=limiter)
    except BaseException:
        call.cancel()  # wakes the (possibly abandoned) reader thread at once
        raise


class StreamStopped(Exception):
    """Raised inside a `consume_stream` worker thread when its awaiting task was cancelled."""


async def consume_stream(call: Any, consume: Callable[[Any, threading.Event], None],
                         limiter: anyio.CapacityLimiter | None = None) -> None:
    """Iterate a streaming call to its end in ONE worker thread, handing every message to
    `consume(message, stopping)` in that thread (the whole stream is a single hop off the loop,
    not one or two per message).

    `stopping` is set when the awaiting task is cancelled: a consumer that waits (a bandwidth
    limit) waits on it and raises StreamStopped. Cancellation also cancels the call, which
    wakes a thread blocked on the next message, and then waits (shielded) until the thread has
    returned, so the consumer's resources are never used after this returns. grpc errors
    (grpc.RpcError) and the consumer's exceptions propagate.
    """
    stopping = threading.Event()
    done = anyio.Event()
    schedule = loop_scheduler()
    state = {"running": False, "stopped": False}
    lock = threading.Lock()

    def drain() -> None:
        with lock:
            if state["stopped"]:
                return
            state["running"] = True
        try:
            for message in call:
                if stopping.is_set():
                    raise StreamStopped()
                consume(message, stopping)
        finally:
            try:
                schedule(done.set)
            except RuntimeError:  # the loop has finished
                pass

    try:
        await anyio.to_thread.run_sync(drain, abandon_on_cancel=True, limiter=limiter)
    except BaseException:
        stopping.set()
        call.cancel()
        with lock:
            state["stopped"] = True
            running = state["running"]
        if running:
            with anyio.CancelScope(shield=True):
                await done.wait()
        raise
