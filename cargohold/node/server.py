"""One node process: etcd session, read model, blob store and the HTTP server, in one task group."""

from __future__ import annotations

import logging
import signal
from contextlib import AsyncExitStack, nullcontext

import anyio

from cargohold.config import Settings, resolve_node_id
from cargohold.coordinator.embedded import embedded_etcd
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata, Member
from cargohold.node.api import RegistryAPI
from cargohold.node.storage import FilesystemBlobStore
from cargohold.node.uploads import UploadManager

log = logging.getLogger("cargohold.node")

UPLOAD_PURGE_INTERVAL = 3600.0


async def serve(settings: Settings) -> None:
    node_id = resolve_node_id(settings)
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        endpoints = settings.etcd
        if not endpoints:
            endpoints = [await stack.enter_async_context(embedded_etcd(data_dir))]
            log.info("started a private etcd at %s", endpoints[0])
        client = await stack.enter_async_context(EtcdClient(
            endpoints, ca_file=settings.etcd_ca, cert_file=settings.etcd_cert, key_file=settings.etcd_key))
        metadata = ClusterMetadata(client, settings.cluster, node_id)
        store = FilesystemBlobStore(data_dir)
        uploads = UploadManager(data_dir / "uploads", store, node_id)
        api = RegistryAPI(metadata, store, uploads, node_id=node_id)
        host, port = settings.host_port
        url = settings.advertise_url or f"{'https' if settings.tls_cert else 'http'}://{host}:{port}"
        member = Member(node_id, settings.site, url, settings.grpc_listen, "active")
        async with anyio.create_task_group() as tg:
            await tg.start(metadata.run)
            tg.start_soon(metadata.keep_membership, member)
            tg.start_soon(_purge_uploads, uploads, settings.upload_expiry)
            log.info("node %s (site %s, cluster %s) serving on %s", node_id, settings.site, settings.cluster, url)
            await _run_http(api, settings)
            tg.cancel_scope.cancel()
    log.info("node %s stopped", node_id)


async def _purge_uploads(uploads: UploadManager, expiry: float) -> None:
    while True:
        removed = await uploads.purge_older_than(expiry)
        if removed:
            log.info("removed %d abandoned upload sessions", removed)
        await anyio.sleep(UPLOAD_PURGE_INTERVAL)


async def _run_http(app, settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, with uvicorn on asyncio or hypercorn on trio."""
    stop = anyio.Event()
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
    config = uvicorn.Config(
        app, host=host, port=port, http="httptools", lifespan="off", access_log=False,
        log_config=None, ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key,
        timeout_keep_alive=30, server_header=False, date_header=False)
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

    config = Config()
    config.bind = [settings.listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.include_server_header = False
    if settings.tls_cert:
        config.certfile, config.keyfile = settings.tls_cert, settings.tls_key
    await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")
