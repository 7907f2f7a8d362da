"""What token verification costs the manifest GET (issue 6 target: < 10%).

Two nodes on one etcd, same build, in the same run: `--auth off`, and `--auth on` with a pull
token in the `Authorization: Bearer` header of every request (wrk -t2 -c16, a Lua script per
side). Rounds alternate which side goes first; medians and the median per-round ratio are
printed. Then the same GET in-process (the ASGI app called directly, thread CPU time), which
does not depend on how busy the machine is. Needs `wrk`. --quick: 2 rounds of 3 s.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from pathlib import Path

import anyio
import httpx

from bench.launch import Etcd, Node
from bench.report import Row, log
from tests.auth.conftest import provision
from tests.support.oci import build_image, push_image

PATH = "/v2/bench/app/manifests/latest"
LUA = f"""wrk.method = "GET"
wrk.path = "{PATH}"
wrk.headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"
"""


async def _prepare(url: str, auth) -> str | None:
    async with httpx.AsyncClient(base_url=url, auth=auth) as c:
        await push_image(c, "bench/app", "latest", build_image("auth-bench"))
        if auth is None:
            return None
        return (await c.get("/token", params={"scope": "repository:bench/app:pull"})).json()["token"]


def _wrk(url: str, script: str, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(out)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def over_http(etcd: Etcd, work: Path, rounds: int, seconds: int) -> dict[str, list[float]]:
    nodes, scripts, token = {}, {}, None
    try:
        for mode in ("off", "on"):
            node = nodes[mode] = Node(work / mode, settings={"log_level": "warning"}, etcd_url=etcd.url,
                                      cluster=f"bench-{mode}", node_id=mode, extra_args=["--auth", mode]).start()
            token = anyio.run(_prepare, node.url, ("admin", "admin-password") if mode == "on" else None)
            scripts[mode] = str(work / f"{mode}.lua")
            header = f'wrk.headers["Authorization"] = "Bearer {token}"\n' if token else ""
            Path(scripts[mode]).write_text(LUA + header)
        rps: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                rps[mode].append(_wrk(nodes[mode].url, scripts[mode], seconds))
            log(f"round {r}: off {rps['off'][-1]:.0f}/s, on {rps['on'][-1]:.0f}/s")
    finally:
        for node in nodes.values():
            node.stop()
    return rps


async def in_process(etcd_url: str, data_dir: Path, token: str, n: int = 20000) -> dict[str, float]:
    """Microseconds of thread CPU per GET through the ASGI app, without and with a Bearer token.
    There is no public factory for the app: this builds it from the node's classes, which the
    auth refactor may change (the one place where the bench reaches inside the node)."""
    from cargohold.coordinator.accounts import AccountStore
    from cargohold.coordinator.etcd import EtcdClient
    from cargohold.coordinator.metadata import ClusterMetadata
    from cargohold.node.api import RegistryAPI
    from cargohold.node.access import AccessControl
    from cargohold.blobs.store import FilesystemBlobStore
    from cargohold.node.uploads import UploadManager

    async with EtcdClient([etcd_url]) as client:
        metadata = ClusterMetadata(client, "bench-on", "bench")
        await metadata.load()
        store = FilesystemBlobStore(data_dir)
        uploads = UploadManager(data_dir / "uploads", store, "bench")
        access = AccessControl(AccountStore(client, "bench-on"), service="cargohold-bench-on", enforce="on")
        await access.prepare()
        apis = {"off": RegistryAPI(metadata, store, uploads), "on": RegistryAPI(metadata, store, uploads, access=access)}
        import logging
        logging.getLogger("cargohold.access").setLevel(logging.WARNING)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            pass

        best = {}
        for mode, api in apis.items():
            headers = [(b"host", b"127.0.0.1"), (b"accept", b"application/vnd.oci.image.manifest.v1+json")]
            if mode == "on":
                headers.append((b"authorization", f"Bearer {token}".encode()))
            scope = {"type": "http", "method": "GET", "path": PATH, "headers": headers, "query_string": b"",
                     "client": ("127.0.0.1", 1), "scheme": "http"}
            runs = []
            for _ in range(5):
                started = time.thread_time()
                for _ in range(n):
                    await api(scope, receive, send)
                runs.append((time.thread_time() - started) / n * 1e6)
            best[mode] = min(runs)
    return best


async def _token(etcd_url: str, work: Path) -> str:
    """A fresh pull token from the `on` node, restarted for the in-process measurement (the image
    is pushed again, a no-op after over_http, so that this part also runs alone)."""
    node = Node(work / "on", etcd_url=etcd_url, cluster="bench-on", node_id="on", extra_args=["--auth", "on"])
    await anyio.to_thread.run_sync(node.start)
    try:
        return await _prepare(node.url, ("admin", "admin-password"))
    finally:
        await anyio.to_thread.run_sync(node.stop)


def add_arguments(ap) -> None:
    ap.add_argument("--rounds", type=int, help="wrk rounds per side (default 6; --quick 2)")
    ap.add_argument("--seconds", type=int, help="seconds per wrk round (default 10; --quick 3)")


def prepare(ctx) -> None:
    ctx.etcd = Etcd(ctx.base / "etcd")
    ctx.etcd.start()
    provision(ctx.etcd.url, "bench-on", users={"admin": "admin-password"}, robots=(), rules=None)


def finish(ctx) -> None:
    if getattr(ctx, "etcd", None):
        ctx.etcd.stop()


def http_part(ctx) -> list[Row]:
    rounds = ctx.args.rounds or (2 if ctx.quick else 6)
    seconds = ctx.args.seconds or (3 if ctx.quick else 10)
    rps = ctx.details["over_http"] = over_http(ctx.etcd, ctx.base, rounds, seconds)
    ratios = [on / off for on, off in zip(rps["on"], rps["off"])]
    return [Row("over_http", "manifest GET with a Bearer token (peer: --auth off)", statistics.median(rps["on"]),
                "req/s", ">= 0.9x", statistics.median(ratios) >= 0.9, peer=statistics.median(rps["off"]),
                note=f"wrk -t2 -c16, {rounds} rounds x {seconds} s alternating; median per-round ratio on/off "
                     f"{statistics.median(ratios):.3f} (judged; the ratio column is of the medians)")]


def in_process_part(ctx) -> list[Row]:
    token = anyio.run(_token, ctx.etcd.url, ctx.base)
    best = ctx.details["in_process"] = anyio.run(in_process, ctx.etcd.url, ctx.base / "on", token, backend="asyncio")
    return [Row("in_process", "thread CPU per GET with a Bearer token (peer: no access control)", best["on"], "us",
                note=f"+{best['on'] - best['off']:.2f} us; best of 5 x 20,000 calls of the ASGI app", peer=best["off"])]


PARTS = {"over_http": http_part, "in_process": in_process_part}
