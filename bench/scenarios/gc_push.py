"""Small-image pushers for the gc scenario: push latency with and without a garbage collection.

Each client is a thread with one keep-alive HTTP/1.1 connection (stdlib `http.client`, little
client-side CPU) to one node. It pushes images continuously until told to stop: a config blob
(~200 bytes) and a layer (1 KiB of random bytes), each with one
`POST /v2/<repo>/blobs/uploads/?digest=<d>` carrying the body (201 expected), then
`PUT /v2/<repo>/manifests/<tag>` with an OCI image manifest (201 expected). Every image has
new content and a new tag, so every blob is uploaded for real and every manifest is live.
Latencies are kept per request kind and per whole image (the three requests back to back).
By default each client pushes back to back (closed loop: as fast as the registry answers,
which on a 2-core machine keeps it busy); with a rate, each starts an image on a fixed
schedule (open loop) and leaves the machine headroom.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bench.report import percentile

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Samples:
    """(time.monotonic() at completion, seconds) per request kind."""
    blob: list[tuple[float, float]] = field(default_factory=list)       # each blob POST
    manifest: list[tuple[float, float]] = field(default_factory=list)   # each manifest PUT
    image: list[tuple[float, float]] = field(default_factory=list)      # whole image: 2 POSTs + PUT
    errors: list[tuple[float, str]] = field(default_factory=list)

    def between(self, start: float, end: float) -> "Samples":
        pick = lambda xs: [x for x in xs if start <= x[0] < end]  # noqa: E731
        return Samples(pick(self.blob), pick(self.manifest), pick(self.image), pick(self.errors))


def summary(samples: list[tuple[float, float]]) -> dict:
    values = [v for _, v in samples]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"n": len(values), "p50_ms": ms(percentile(values, 50)), "p90_ms": ms(percentile(values, 90)),
            "p99_ms": ms(percentile(values, 99)), "max_ms": ms(max(values) if values else None)}


class Pusher(threading.Thread):
    def __init__(self, url: str, repo: str, stop: threading.Event, *, timeout: float = 30.0, rate: float = 0.0):
        super().__init__(daemon=True, name=f"pusher-{repo}")
        self.rate = rate          # images/s; 0: back to back (closed loop)
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.repo = repo
        self.stop_event = stop
        self.timeout = timeout
        self.samples = Samples()
        self.count = 0
        self.conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _blob(self, data: bytes) -> tuple[str, float]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = time.perf_counter()
        status, body = self._request("POST", f"/v2/{self.repo}/blobs/uploads/?digest={digest}", data,
                                     {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        elapsed = time.perf_counter() - started
        if status != 201:
            raise RuntimeError(f"blob POST {digest}: {status} {body[:300]!r}")
        return digest, elapsed

    def push_one(self, sink: Samples) -> None:
        n = self.count
        self.count += 1
        started = time.perf_counter()
        config = json.dumps({"architecture": "amd64", "os": "linux", "bench": f"{self.repo}:{n}",
                             "nonce": os.urandom(8).hex()}).encode()
        layer = os.urandom(1024)
        config_digest, t_config = self._blob(config)
        layer_digest, t_layer = self._blob(layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                        "size": len(layer)}],
        }).encode()
        t0 = time.perf_counter()
        status, body = self._request("PUT", f"/v2/{self.repo}/manifests/t{n}", manifest,
                                     {"Content-Type": MANIFEST_TYPE, "Content-Length": str(len(manifest))})
        t_manifest = time.perf_counter() - t0
        if status != 201:
            raise RuntimeError(f"manifest PUT {self.repo}:t{n}: {status} {body[:300]!r}")
        now = time.monotonic()
        sink.blob += [(now, t_config), (now, t_layer)]
        sink.manifest.append((now, t_manifest))
        sink.image.append((now, time.perf_counter() - started))

    def run(self) -> None:
        next_start = time.monotonic()
        while not self.stop_event.is_set():
            if self.rate > 0:
                # Open loop at a fixed rate: start on schedule; when a push ran late, the next
                # one starts at once and the schedule restarts from now (no backlog burst).
                delay = next_start - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break
                next_start = max(next_start, time.monotonic() - 1.0 / self.rate) + 1.0 / self.rate
            sink = self.samples
            try:
                self.push_one(sink)
            except Exception as exc:  # noqa: BLE001 - recorded and reported; the run goes on
                sink.errors.append((time.monotonic(), f"{time.strftime('%H:%M:%S')} {exc}"))
                time.sleep(0.05)
        if self.conn is not None:
            self.conn.close()


class PushSession:
    """One pusher per URL, pushing until `stop()`; every sample is kept with its time, so
    windows (before, during and after a GC run, or one GC phase) are cut afterwards."""

    def __init__(self, urls: list[str], repo_prefix: str, rate: float = 0.0):
        self.stop_event = threading.Event()
        self.urls = urls
        self.pushers = [Pusher(url, f"{repo_prefix}-{i}", self.stop_event, rate=rate) for i, url in enumerate(urls)]

    def start(self) -> "PushSession":
        for p in self.pushers:
            p.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for p in self.pushers:
            p.join(60)

    def samples(self, start: float = 0.0, end: float = float("inf")) -> Samples:
        total = Samples()
        for p in self.pushers:
            part = p.samples.between(start, end)
            total.blob += part.blob
            total.manifest += part.manifest
            total.image += part.image
            total.errors += part.errors
        return total

    def per_node(self, start: float = 0.0, end: float = float("inf")) -> dict:
        return {url: {"images": len(s.image), "manifest": summary(s.manifest), "image": summary(s.image)}
                for url, s in ((p_url, p.samples.between(start, end)) for p_url, p in zip(self.urls, self.pushers))}
