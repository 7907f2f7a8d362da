"""What token verification costs the manifest GET (issue 6 target: < 10%). Run by hand:

    /work/venv/bin/python bench/auth_overhead.py [--rounds 6] [--seconds 10]

Two nodes on one etcd, same build, in the same run: `--auth off`, and `--auth on` with a pull
token in the `Authorization: Bearer` header of every request (wrk -t2 -c16, a Lua script per
side). Rounds alternate which side goes first; medians and the median per-round ratio are
printed. Then the same GET in-process (the ASGI app called directly, thread CPU time), which
does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.auth.conftest import provision  # noqa: E402
from tests.support.etcd import EtcdProcess  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402
from tests.support.oci import build_image, push_image  # noqa: E402

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


def over_http(etcd: EtcdProcess, work: Path, rounds: int, seconds: int) -> str:
    provision(etcd.url, "bench-on", users={"admin": "admin-password"}, robots=(), rules=None)
    nodes, scripts, token = {}, {}, None
    try:
        for mode in ("off", "on"):
            node = nodes[mode] = NodeProcess(work / mode, etcd_url=etcd.url, cluster=f"bench-{mode}", node_id=mode,
                                             extra_args=["--auth", mode, "--log-level", "warning"]).start()
            token = anyio.run(_prepare, node.url, ("admin", "admin-password") if mode == "on" else None)
            scripts[mode] = str(work / f"{mode}.lua")
            header = f'wrk.headers["Authorization"] = "Bearer {token}"\n' if token else ""
            Path(scripts[mode]).write_text(LUA + header)
        rps: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                rps[mode].append(_wrk(nodes[mode].url, scripts[mode], seconds))
            print(f"round {r}: off {rps['off'][-1]:.0f}/s, on {rps['on'][-1]:.0f}/s", flush=True)
    finally:
        for node in nodes.values():
            node.stop()
    ratios = [on / off for on, off in zip(rps["on"], rps["off"])]
    return (f"over HTTP: median off {statistics.median(rps['off']):.0f}/s, on {statistics.median(rps['on']):.0f}/s, "
            f"median per-round ratio on/off {statistics.median(ratios):.3f}")


async def in_process(etcd_url: str, data_dir: Path, token: str, n: int = 20000) -> str:
    from cargohold.coordinator.accounts import AccountStore
    from cargohold.coordinator.etcd import EtcdClient
    from cargohold.coordinator.metadata import ClusterMetadata
    from cargohold.node.api import RegistryAPI
    from cargohold.node.auth import AccessControl
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
    return (f"in-process: {best['off']:.2f} us per GET without access control, {best['on']:.2f} us with a Bearer "
            f"token (+{best['on'] - best['off']:.2f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="auth-bench-"))
    etcd = EtcdProcess(work / "etcd")
    etcd.start()
    try:
        print(over_http(etcd, work, args.rounds, args.seconds))
        token = anyio.run(_token, etcd.url, work)
        print(anyio.run(in_process, etcd.url, work / "on", token, backend="asyncio"))
    finally:
        etcd.stop()


async def _token(etcd_url: str, work: Path) -> str:
    """A fresh pull token from the `on` node, restarted for the in-process measurement."""
    node = NodeProcess(work / "on", etcd_url=etcd_url, cluster="bench-on", node_id="on",
                       extra_args=["--auth", "on"])
    await anyio.to_thread.run_sync(node.start)
    try:
        async with httpx.AsyncClient(base_url=node.url, auth=("admin", "admin-password")) as c:
            return (await c.get("/token", params={"scope": "repository:bench/app:pull"})).json()["token"]
    finally:
        await anyio.to_thread.run_sync(node.stop)


if __name__ == "__main__":
    main()
