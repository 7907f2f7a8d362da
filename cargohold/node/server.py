"""One node process: etcd session, read model, blob store, replication, and the HTTP server,
all started in one task group and stopped together."""

from __future__ import annotations

import logging
import signal
from contextlib import AsyncExitStack, nullcontext
from typing import Callable
from urllib.parse import urlsplit

import anyio

from cargohold import __version__
from cargohold.config import Settings, resolve_node_id
from cargohold.units import parse_duration, parse_size, parse_window
from cargohold.gc.collector import GarbageCollector
from cargohold.gc.node_sweep import NodeSweep
from cargohold.coordinator.embedded import embedded_etcd
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata, Member
from cargohold.coordinator.peersecret import PeerSecretStore
from cargohold.node.api import RegistryAPI
from cargohold.node.access import access_control
from cargohold.node.bootstrap import bootstrap_admin
from cargohold.node.forward import UploadForwarder, owner_tag
from cargohold.node.limits import ConnectionLimits, capped_hypercorn, connection_cap, guarded_httptools
from cargohold.node.metrics import Metrics, NodeFigures, PullThroughFigures, ReplicationFigures, SiteRuleLag
from cargohold.oci.reference import parse_digest
from cargohold.upstream.client import Timeouts
from cargohold.pullthrough.usage import Evictor, PullRecorder
from cargohold.blobs.store import FilesystemBlobStore
from cargohold.node.uploads import UploadManager
from cargohold.runtime.pacing import BackgroundPace, Foreground
from cargohold.pullthrough.cache import PullThrough
from cargohold.pullthrough.figures import CacheFigures
from cargohold.pullthrough.fill import BlobFiller
from cargohold.replication.remote import PeerContent
from cargohold.replication.replicator import Replicator
from cargohold.replication.sources import ReplicationSettings
from cargohold.replication.status import replication_status
from cargohold.replication.transfer import PeerClient, ReplicationService, TlsFiles, grpc_server

log = logging.getLogger("cargohold.node")

UPLOAD_PURGE_INTERVAL = 3600.0


async def serve(settings: Settings) -> None:
    node_id = resolve_node_id(settings)
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = anyio.Event()
    async with AsyncExitStack() as stack:
        endpoints = settings.etcd
        if not endpoints:
            endpoints = [await stack.enter_async_context(embedded_etcd(data_dir))]
            log.info("started a private etcd at %s", endpoints[0])
        client = await stack.enter_async_context(EtcdClient(
            endpoints, ca_file=settings.etcd_ca, cert_file=settings.etcd_cert, key_file=settings.etcd_key))
        metadata = ClusterMetadata(client, settings.cluster, node_id,
                                   consistent_tag_reads=settings.consistent_tag_reads)
        store = FilesystemBlobStore(data_dir)
        uploads = UploadManager(data_dir / "uploads", store, node_id, id_suffix=owner_tag(node_id),
                                max_blob_size=parse_size(settings.max_blob_size) or None,
                                max_per_account=settings.max_uploads_per_account or None)
        tls = (TlsFiles(settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_ca)
               if settings.grpc_tls_cert else None)
        peer_secret = PeerSecretStore(client, settings.cluster)
        await peer_secret.ensure()      # the cluster's first node creates it
        peers = PeerClient(tls=tls, keyring=peer_secret.current)
        stack.callback(peers.close)
        service = _service(store)
        grpc_port = await stack.enter_async_context(grpc_server(
            settings.grpc_listen, service, tls=tls, keyring=_checked_keyring(settings, peer_secret)))
        grace = parse_duration(settings.gc_grace)
        foreground = Foreground()
        replicator = Replicator(metadata, store, peers, _replication_settings(settings, node_id))
        remote = PeerContent(metadata, peers, replicator.holders)
        sweep = NodeSweep(metadata, store, node_id=node_id, grace=grace,
                          pace=BackgroundPace(foreground, settings.gc_busy_rate))
        collector = GarbageCollector(
            metadata, grace=grace,
            untagged_after=parse_duration(settings.untagged_after) if settings.untagged_after else None,
            interval=parse_duration(settings.gc_interval) if settings.gc_interval else 0.0,
            window=parse_window(settings.gc_window) if settings.gc_window else None,
            workers=settings.gc_workers, batch=settings.gc_batch,
            pace=BackgroundPace(foreground, settings.gc_busy_rate))
        forwarder = UploadForwarder(node_id, lambda: _live_urls(metadata))
        stack.push_async_callback(forwarder.aclose)
        access = access_control(settings, client, metadata, node_id, _http_url(settings))
        recorder = PullRecorder(metadata, interval=settings.pull_record_interval)
        pullthrough = _pullthrough(metadata, store, remote, node_id, access, recorder, settings)
        replicator.status_sections["pullthrough"] = pullthrough.figures.status
        service.open_fill, service.stall_timeout = pullthrough.filler.tail_from_thread, settings.upstream_read_timeout
        metrics = _metrics(client, metadata, node_id, lambda: _replication_figures(metadata, replicator, remote, sweep),
                           pullthrough.figures)
        if access is not None:
            await bootstrap_admin(access.accounts, settings)
            await access.prepare()   # loads accounts; refuses to serve an open registry on a public address
        api = RegistryAPI(metadata, store, uploads, node_id=node_id, remote=remote, forwarder=forwarder,
                          metrics=metrics, min_copies=settings.min_copies, access=access,
                          sync_sites=settings.sync_sites, body_timeout=settings.body_timeout,
                          min_body_rate=parse_size(settings.min_body_rate),
                          foreground=foreground, pullthrough=pullthrough)
        evictor = Evictor(metadata, interval=settings.eviction_interval,
                          audit=access.audit.record if access is not None else lambda *a, **k: None)
        member = Member(node_id, settings.site, _http_url(settings), _grpc_address(settings, grpc_port),
                        "active", __version__)
        async with anyio.create_task_group() as tg:
            await tg.start(metadata.run)
            if access is not None:
                tg.start_soon(access.run)
            member = await metadata.register(member)
            tg.start_soon(metadata.keep_membership, member)
            tg.start_soon(peer_secret.run)
            tg.start_soon(replicator.run)
            await tg.start(pullthrough.run)
            await tg.start(pullthrough.filler.run)
            tg.start_soon(sweep.run)
            tg.start_soon(collector.run)
            tg.start_soon(recorder.run)
            tg.start_soon(evictor.run)
            tg.start_soon(_purge_uploads, uploads, settings.upload_expiry)
            tg.start_soon(_stop_when_drained, replicator, stop)
            log.info("node %s (site %s, cluster %s, %s) serving on %s, gRPC on %s", node_id, settings.site,
                     settings.cluster, member.state, member.url, member.grpc)
            await _run_http(api, settings, stop)
            tg.cancel_scope.cancel()
    log.info("node %s stopped", node_id)


def _replication_settings(settings: Settings, node_id: str) -> ReplicationSettings:
    return ReplicationSettings(
        node_id, settings.site, replicas_per_site=settings.replicas_per_site, down_after=settings.down_after,
        workers=settings.replication_workers, per_peer_streams=settings.per_peer_streams,
        site_bandwidth={site: parse_size(rate) for site, rate in (settings.site_bandwidth or {}).items()},
        storage_limit=parse_size(settings.storage_limit) if settings.storage_limit else None)


def _service(store: FilesystemBlobStore) -> ReplicationService:
    def open_blob(digest: str):
        try:
            return open(store.path_of(parse_digest(digest)), "rb")
        except FileNotFoundError:
            return None

    def valid(digest: str) -> bool:
        try:
            parse_digest(digest)
            return True
        except Exception:  # noqa: BLE001 - any parse failure means invalid
            return False

    return ReplicationService(open_blob, valid)


def _checked_keyring(settings: Settings, peer_secret: PeerSecretStore):
    """What the gRPC server checks calls against: None with --grpc-insecure (config.py allows it
    only on loopback or with mutual TLS)."""
    if not settings.grpc_insecure:
        return peer_secret.current
    log.warning("--grpc-insecure: the gRPC port %s serves anybody who reaches it, without a peer credential",
                settings.grpc_listen)
    return None


def _live_urls(metadata: ClusterMetadata) -> dict[str, str]:
    alive = metadata.alive()
    return {node_id: m.url for node_id, m in metadata.members().items() if node_id in alive}


def _http_url(settings: Settings) -> str:
    if settings.advertise_url:
        return settings.advertise_url.rstrip("/")
    host, port = settings.host_port
    return f"{'https' if settings.tls_cert else 'http'}://{host}:{port}"


def _grpc_address(settings: Settings, port: int) -> str:
    if settings.grpc_advertise:
        return settings.grpc_advertise
    host = settings.grpc_host
    if host in ("", "0.0.0.0", "::"):
        host = urlsplit(_http_url(settings)).hostname or "127.0.0.1"
    return f"{host}:{port}"


def _metrics(client: EtcdClient, metadata: ClusterMetadata, node_id: str,
             replication: Callable[[], ReplicationFigures], pullthrough: CacheFigures) -> Metrics:
    return Metrics(NodeFigures(etcd=client, metadata=metadata, node_id=node_id, replication=replication),
                   PullThroughFigures(pullthrough))


def _pullthrough(metadata: ClusterMetadata, store: FilesystemBlobStore, remote: PeerContent, node_id: str,
                 access, recorder: PullRecorder, settings: Settings) -> PullThrough:
    """The cache behind remote repositories: manifests and tags here, blobs through the filler,
    every manifest GET noted by eviction's pull recorder."""
    figures = CacheFigures()
    audit = access.audit.record if access is not None else (lambda event, **fields: None)
    filler = BlobFiller(metadata, store, remote, node_id, figures=figures, audit=audit,
                        max_blob_size=parse_size(settings.max_blob_size) or None)
    timeouts = Timeouts(connect=settings.upstream_connect_timeout, read=settings.upstream_read_timeout,
                        total=max(60.0, 2 * settings.upstream_read_timeout))
    return PullThrough(metadata, store, figures=figures, audit=audit, filler=filler, recorder=recorder,
                       timeouts=timeouts, site=settings.site, node_id=node_id)


def _replication_figures(metadata: ClusterMetadata, replicator: Replicator, remote: PeerContent,
                         sweep: NodeSweep) -> ReplicationFigures:
    """What /metrics reads of replication and the node's GC sweep: the one place that knows
    where those counters live."""
    sites = [SiteRuleLag(row["site"], row["rule"], row["pending"], row["lag_seconds"])
             for row in replication_status(metadata)["rules"]]
    stats = replicator.stats
    return ReplicationFigures(
        queued=replicator.queue_depth(), in_flight=stats.in_flight, fetched_bytes=replicator.fetcher.bytes_fetched,
        copies_made=stats.copies_made, copies_dropped=stats.copies_dropped, copies_deleted=sweep.copies_deleted,
        orphans_removed=sweep.orphans_removed, failures=stats.failures, remote_reads=remote.remote_reads,
        sites=sites)


async def _purge_uploads(uploads: UploadManager, expiry: float) -> None:
    while True:
        removed = await uploads.purge_idle(expiry)
        if removed:
            log.info("removed %d abandoned upload sessions", removed)
        # a session is removed at most a quarter of `expiry` late
        await anyio.sleep(min(UPLOAD_PURGE_INTERVAL, expiry / 4))


async def _stop_when_drained(replicator: Replicator, stop: anyio.Event) -> None:
    await replicator.drained.wait()
    log.info("this node has left the cluster: stopping")
    stop.set()


async def _run_http(app, settings: Settings, stop: anyio.Event) -> None:
    """Serve until SIGTERM or SIGINT (or `stop`), with uvicorn on asyncio or hypercorn on trio."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_wait_for_signal, stop)
        if settings.runtime == "trio":
            await _hypercorn(app, settings, stop)
        else:
            await _uvicorn(app, settings, stop)
        tg.cancel_scope.cancel()


async def _wait_for_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            stop.set()
            return


async def _uvicorn(app, settings: Settings, stop: anyio.Event) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):  # signals are ours: we shut down the whole node, not just HTTP
            return nullcontext()

    host, port = settings.host_port
    limits = _connection_limits(settings)
    config = uvicorn.Config(
        app, host=host, port=port, http=guarded_httptools(limits), lifespan="off", access_log=False,
        log_config=None, ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key,
        timeout_keep_alive=limits.keep_alive_timeout, server_header=False, date_header=False,
        proxy_headers=False)   # X-Forwarded-For is believed only from trusted_proxies (node/access.py)
    server = Server(config)

    async def trigger() -> None:
        await stop.wait()
        server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(trigger)
        await server.serve()
        tg.cancel_scope.cancel()


async def _hypercorn(app, settings: Settings, stop: anyio.Event) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    limits = _connection_limits(settings)
    config = Config()
    config.bind = [settings.listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # hypercorn's idle timer runs until a whole head has arrived: it is the head timeout too.
    config.keep_alive_timeout = min(limits.keep_alive_timeout, limits.header_timeout)
    config.h11_max_incomplete_size = limits.max_header_size
    config.include_server_header = False
    capped_hypercorn(limits.max_connections)
    if settings.tls_cert:
        config.certfile, config.keyfile = settings.tls_cert, settings.tls_key
    await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")


def _connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(header_timeout=settings.header_timeout, keep_alive_timeout=settings.keep_alive_timeout,
                            max_header_size=parse_size(settings.max_header_size),
                            max_connections=connection_cap(settings.max_connections))
