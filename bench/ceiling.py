"""The fastest any digest-verifying pull-through cache could fill on this machine, from the cost
of the work no such cache can skip, measured here and now.

A cold pull through a cache moves every byte five times on the same cores: the upstream sends
it, the cache receives it, hashes it (the digest must be checked before the blob is
published), sends it on, and the client receives it. A direct pull only has the first and the
last. With the CPU-seconds per GB of each step, `cores / sum` is a ceiling for a cache that did
nothing else and kept every core busy; dividing by the direct pull's speed gives the best ratio
"cold through a cache / direct" this machine allows. Nothing here is cargohold's cost.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

MiB = 1 << 20


@dataclass(frozen=True)
class Ceiling:
    upstream_send: float      # cpu-s/GB, measured on the direct pulls (the upstream's own CPU)
    receive: float            # cpu-s/GB to receive from a loopback socket (one recv_into buffer)
    sha256: float             # cpu-s/GB of hashlib's sha256 on this CPU
    cores: int

    @property
    def per_gb(self) -> float:
        """upstream send + cache receive + hash + cache send (as cheap as the upstream's) + client receive."""
        return self.upstream_send + self.receive + self.sha256 + self.upstream_send + self.receive

    @property
    def mb_per_s(self) -> float:
        return self.cores / self.per_gb * 1000

    def describe(self) -> str:
        return (f"{self.cores} cores / ({self.upstream_send:.2f} upstream send + {self.receive:.2f} cache receive + "
                f"{self.sha256:.2f} sha256 + {self.upstream_send:.2f} cache send + {self.receive:.2f} client "
                f"receive = {self.per_gb:.2f} cpu-s/GB)")


def sha256_cost(data: bytes, total: int = 512 * MiB) -> float:
    """CPU-seconds per GB that hashlib's sha256 takes here (hashing `data` over and over)."""
    hasher = hashlib.sha256()
    rounds = max(1, total // len(data))
    started = time.process_time()
    for _ in range(rounds):
        hasher.update(data)
    return (time.process_time() - started) / (rounds * len(data) / 1e9)


def receive_cost(url: str, size: int, times: int = 4) -> float:
    """CPU-seconds per GB this process spends receiving `url` (a plain-HTTP blob of `size` bytes)
    from a loopback socket into one reused 1 MiB buffer: the least any receiver pays."""
    parts = urlsplit(url)
    buffer = memoryview(bytearray(MiB))
    started, received = time.process_time(), 0
    for _ in range(times):
        with socket.create_connection((parts.hostname, parts.port)) as sock:
            sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
            while (n := sock.recv_into(buffer)):
                received += n
    if received < times * size:
        raise RuntimeError(f"{url}: received {received} of {times * size} bytes")
    return (time.process_time() - started) / (received / 1e9)


def measure(blob_url: str, blob_size: int, sample: bytes, upstream_send: float) -> Ceiling:
    return Ceiling(upstream_send=upstream_send, receive=receive_cost(blob_url, blob_size),
                   sha256=sha256_cost(sample), cores=os.cpu_count() or 1)
