"""Index N repositories x T tags through the OCI API, with many concurrent clients.

Every repository gets the same two small blobs (config + layer, monolithic
POST), one manifest that differs per repository (an annotation carries the
repository name), and T tags pointing at that manifest: 2 + T requests per
repository.  The clients run in several processes (asyncio + httpx in each) so
the Python client is not the bottleneck, and everything stops at a deadline.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time

import httpx

from bench import oci

ANNOTATION = "org.cargohold.bench.repo"


def repo_name(i: int) -> str:
    return f"mem/r{i:05d}"


def tag_name(t: int) -> str:
    return f"t{t}"


def manifest(i: int) -> bytes:
    return oci.manifest_for(oci.image_blobs(seed=7), {ANNOTATION: repo_name(i)})


async def _done(r):
    return r


def _worker(url, indices, n_tags, deadline, conc, repos_done, requests, errors, stop, errq):
    asyncio.run(_worker_main(url, indices, n_tags, deadline, conc, repos_done, requests,
                             errors, stop, errq))


async def _worker_main(url, indices, n_tags, deadline, conc, repos_done, requests, errors,
                       stop, errq):
    blobs = oci.image_blobs(seed=7)
    blob_list = [(oci.digest_of(b), b) for b in blobs.values()]
    it = iter(indices)
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, limits=limits,
                                 timeout=httpx.Timeout(60.0, connect=10.0)) as c:

        async def expect(coro, code):
            r = await coro
            with requests.get_lock():
                requests.value += 1
            if r.status_code != code:
                raise RuntimeError(f"{r.request.method} {r.request.url.path} -> "
                                   f"{r.status_code}: {r.text[:200]}")

        async def one_repo(i):
            name = repo_name(i)
            for dg, b in blob_list:
                r = await c.post(f"/v2/{name}/blobs/uploads/", params={"digest": dg},
                                 content=b, headers={"Content-Type": "application/octet-stream"})
                if r.status_code == 202:   # no single-POST upload: the spec's PUT fallback
                    with requests.get_lock():
                        requests.value += 1
                    loc = r.headers["Location"]
                    sep = "&" if "?" in loc else "?"
                    await expect(c.put(f"{loc}{sep}digest={dg.replace(':', '%3A')}", content=b,
                                       headers={"Content-Type": "application/octet-stream"}),
                                 201)
                else:
                    await expect(_done(r), 201)
            body = manifest(i)
            for t in range(n_tags):
                await expect(c.put(f"/v2/{name}/manifests/{tag_name(t)}", content=body,
                                   headers={"Content-Type": oci.OCI_MANIFEST}), 201)

        async def task():
            for i in it:
                if time.time() > deadline or stop.value:
                    return
                try:
                    await one_repo(i)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with errors.get_lock():
                        errors.value += 1
                        if errors.value <= 5:
                            errq.put(f"{repo_name(i)}: {type(e).__name__}: {e}")
                        if errors.value > 50:
                            stop.value = 1
                    continue
                with repos_done.get_lock():
                    repos_done.value += 1

        await asyncio.gather(*(task() for _ in range(conc)))


def index(url: str, n_repos: int, n_tags: int, *, timeout: float, procs: int = 4,
          conc_per_proc: int = 8, progress=print, every: float = 10.0) -> dict:
    ctx = mp.get_context("spawn")
    repos_done = ctx.Value("q", 0)
    requests = ctx.Value("q", 0)
    errors = ctx.Value("q", 0)
    stop = ctx.Value("b", 0)
    errq = ctx.Queue()
    t0 = time.time()
    deadline = t0 + timeout
    workers = [ctx.Process(target=_worker, daemon=True,
                           args=(url, list(range(w, n_repos, procs)), n_tags, deadline,
                                 conc_per_proc, repos_done, requests, errors, stop, errq))
               for w in range(procs)]
    for w in workers:
        w.start()
    last = t0
    try:
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(timeout=0.5)
            now = time.time()
            if now - last >= every:
                last = now
                done = repos_done.value
                rate = requests.value / (now - t0)
                eta = (n_repos - done) * (2 + n_tags) / rate if rate else float("inf")
                progress(f"{done:,}/{n_repos:,} repos, {requests.value:,} requests, "
                         f"{errors.value} errors, {rate:,.0f} req/s, "
                         f"{now - t0:.0f}s elapsed, ~{eta:.0f}s left")
            if now > deadline + 60:
                progress("deadline passed by 60s; stopping the client processes")
                break
    finally:
        stop.value = 1
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)
    first_errors = []
    while not errq.empty():
        first_errors.append(errq.get())
    return {"repos_done": repos_done.value, "requests": requests.value,
            "errors": errors.value, "first_errors": first_errors,
            "seconds": time.time() - t0, "concurrency": procs * conc_per_proc,
            "client_processes": procs, "timed_out": time.time() > deadline}


def spot_check(url: str, n_done: int, n_tags: int, samples: int = 50, seed: int = 3) -> dict:
    """GET random (repo, tag) pairs and compare the bytes; list the tags of one repo."""
    rnd = random.Random(seed)
    ok = bad = 0
    problems = []
    if n_done == 0:
        return {"checked": 0, "ok": 0, "bad": 0, "problems": []}
    with oci.client(url) as c:
        for _ in range(samples):
            i = rnd.randrange(n_done)
            t = rnd.randrange(n_tags)
            r = c.get(f"/v2/{repo_name(i)}/manifests/{tag_name(t)}",
                      headers={"Accept": oci.OCI_MANIFEST})
            if r.status_code == 200 and r.content == manifest(i):
                ok += 1
            else:
                bad += 1
                if len(problems) < 5:
                    problems.append(f"{repo_name(i)}:{tag_name(t)} -> {r.status_code}")
        r = c.get(f"/v2/{repo_name(0)}/tags/list")
        want = sorted(tag_name(t) for t in range(n_tags))
        tags_ok = r.status_code == 200 and sorted(r.json().get("tags") or []) == want
        if not tags_ok:
            problems.append(f"tags/list {repo_name(0)} -> {r.status_code} {r.text[:200]}")
    return {"checked": samples, "ok": ok, "bad": bad, "tags_list_ok": tags_ok,
            "problems": problems}
