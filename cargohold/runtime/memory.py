"""How the node process asks glibc's allocator to treat large buffers.

A node moves blobs in 1 MiB pieces: gRPC messages, HTTP bodies, file reads. By default glibc
serves each such allocation with a fresh mmap and unmaps it when freed, so every piece costs
256 page faults, and on VMs whose memory balloon takes freed pages back each fault goes to
the host. Measured here (bench/CLUSTER.md): a gRPC holder serving 1 MiB blobs used 2.2 ms of
CPU per MiB that way and 0.7 ms with the settings below.

So allocations up to 32 MiB come from the heap, and up to 64 MiB of freed memory at the top
of each heap is kept for the next piece instead of being handed back. An operator who sets
glibc's own knobs (GLIBC_TUNABLES, MALLOC_*_ variables) keeps them.

`without_cycle_collection` keeps Python's cycle collector out of large allocation bursts (the
read model's GC snapshot, the GC's mark).
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from cargohold.runtime import libc

MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # from glibc's malloc.h


def _operator_chose() -> bool:
    return ("glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ))


def keep_large_buffers() -> bool:
    """Apply the thresholds; False where there is no glibc or the operator chose otherwise."""
    if not sys.platform.startswith("linux") or _operator_chose():
        return False
    mallopt = libc.function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:                    # musl and others
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextmanager
def without_cycle_collection() -> Iterator[None]:
    """For a burst of allocations that makes no reference cycles (copying the read model,
    the GC's mark): without it, the burst sets off full collections that walk every object
    of a large read model, 5 times the copy's own cost, with the event loop stopped."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
