"""Run a cargohold node with wall-clock timers around its replication steps (bench/cluster.py --trace).

    python bench/cluster_trace.py OUT.json serve --etcd ... (the usual `cargohold serve` arguments)

Nothing in cargohold is edited: a few of its functions are wrapped at import time in this
process only, and the totals (calls, seconds, max) are written to OUT.json when the node
exits and every 0.5 s while it runs. The wrapped steps of fetching one blob for a new owner:

    reconcile                    the whole step for one blob (no-ops included)
      fetch                        copy from a peer into the store
        fetch.stream_and_write       gRPC stream + write + hash (PeerClient.copy: one worker
                                     thread per holder stream; Replicator._fetch_into in older trees)
        fetch.fsync_staging          older trees only: replicator._sync_close (flush + fsync)
        store.ingest                 FilesystemBlobStore.ingest (fsync, rename, fsync dir)
          store.ingest.in_thread       its worker-thread part (the rest: waiting for a thread)
          store.ingest.fsync_dir       the directory fsync after the rename
      record_copy                  ClusterMetadata.record_copy
        etcd.txn                     EtcdClient.txn (the round trip)
        readmodel.wait_for           waiting for the watch to bring the txn's revision back
    drop_copy                    an old owner withdrawing its copy (txn + wait)
    store.delete                 unlinking the dropped copy
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import threading
import time
from pathlib import Path

OUT = Path(sys.argv[1])
STATS: dict[str, list[float]] = {}      # name -> [calls, seconds, max]
_lock = threading.Lock()


def _note(name: str, seconds: float) -> None:
    with _lock:
        s = STATS.setdefault(name, [0, 0.0, 0.0])
        s[0] += 1
        s[1] += seconds
        s[2] = max(s[2], seconds)


def _async(name, fn):
    @functools.wraps(fn)
    async def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            _note(name, time.perf_counter() - t)
    return wrapper


def _sync(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            _note(name, time.perf_counter() - t)
    return wrapper


def _caller() -> str:
    f = sys._getframe(2)
    skip = {"wrapper", "_txn", "_get", "_unary", "_retrying", "attempt", "_by_caller"}
    while f is not None and (f.f_code.co_name in skip or "cluster_trace" in f.f_code.co_filename):
        f = f.f_back
    return f.f_code.co_name if f is not None else "?"


def _by_caller(name, fn):
    import inspect
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        def agen(*a, **kw):
            _note(f"{name}<-{_caller()}", 0.0)
            return fn(*a, **kw)
        return agen

    @functools.wraps(fn)
    async def wrapper(*a, **kw):
        caller = _caller()
        t = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            _note(f"{name}<-{caller}", time.perf_counter() - t)
    return wrapper


def _dump() -> None:
    with _lock:
        doc = {k: {"calls": v[0], "seconds": round(v[1], 6), "max": round(v[2], 6)} for k, v in STATS.items()}
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(OUT)


def _dumper() -> None:
    while True:
        time.sleep(0.5)
        try:
            _dump()
        except Exception:  # noqa: BLE001 - best effort
            pass


def install() -> None:
    from cargohold.coordinator import etcd, metadata, readmodel
    from cargohold.blobs import store as storage
    from cargohold.replication import replicator, transfer

    R = replicator.Replicator
    R.reconcile = _async("reconcile", R.reconcile)
    try:
        from cargohold.replication.fetch import Fetcher as F    # newer trees: fetches split out
    except ImportError:
        F = R
    F.fetch = _async("fetch", F.fetch)
    # older trees: stream, then write+hash per chunk, then flush+fsync; newer: one thread per
    # holder stream writes and hashes as it goes (PeerClient.copy)
    if hasattr(R, "_fetch_into"):
        R._fetch_into = _async("fetch.stream_and_write", R._fetch_into)
    if hasattr(replicator, "_sync_close"):
        replicator._sync_close = _sync("fetch.fsync_staging", replicator._sync_close)
    if hasattr(replicator, "_write_hash"):
        replicator._write_hash = _sync("fetch.write_hash_chunk", replicator._write_hash)
    if hasattr(transfer.PeerClient, "copy"):
        transfer.PeerClient.copy = _async("fetch.stream_and_write", transfer.PeerClient.copy)
    S = storage.FilesystemBlobStore
    S.ingest = _async("store.ingest", S.ingest)
    # the part of ingest that runs in the worker thread; the rest is waiting for a thread
    for name in ("ingest_blocking", "_ingest"):     # its name in newer and older trees
        if hasattr(S, name):
            setattr(S, name, _sync("store.ingest.in_thread", getattr(S, name)))
    storage.fsync_directory = _sync("store.ingest.fsync_dir", storage.fsync_directory)
    S.delete = _async("store.delete", S.delete)
    M = metadata.ClusterMetadata
    M.record_copy = _async("record_copy", M.record_copy)
    M.drop_copy = _async("drop_copy", M.drop_copy)
    etcd.EtcdClient.txn = _async("etcd.txn", etcd.EtcdClient.txn)
    # every etcd call the node makes, by client method and by the ClusterMetadata (or other)
    # function that made it: shows requests the node's own metric does not count
    for method in ("txn", "get", "get_prefix", "iter_prefix", "put", "delete", "current_revision",
                   "grant_lease", "revoke_lease"):
        fn = getattr(etcd.EtcdClient, method, None)
        if fn is not None:
            setattr(etcd.EtcdClient, method, _by_caller(f"etcd.call.{method}", fn))
    readmodel.ReadModel.wait_for = _async("readmodel.wait_for", readmodel.ReadModel.wait_for)


if __name__ == "__main__":
    install()
    atexit.register(_dump)
    threading.Thread(target=_dumper, daemon=True).start()
    from cargohold.cli.main import main
    sys.argv = ["cargohold", *sys.argv[2:]]
    code = main()
    _dump()
    sys.exit(code)
