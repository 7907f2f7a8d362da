"""Issue 12, item 6: slow and idle clients cannot hold sockets or memory; on both runtimes.

A node with short limits (seconds, not minutes) and raw sockets that behave as the attacker did:
connections that send nothing or half a head, a 16 MiB head, more connections than the cap, and
an upload body trickling a byte a second."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import RUNTIMES
from tests.security.conftest import node_with_settings
from tests.support.poll import until

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 8
LIMITS = f"""
header_timeout: {HEADER_TIMEOUT}
keep_alive_timeout: 5
max_header_size: 16K
max_connections: {MAX_CONNECTIONS}
body_timeout: {BODY_TIMEOUT}
min_body_rate: 1K
"""


@pytest.fixture(scope="module", params=RUNTIMES)
def node(request, tmp_path_factory, etcd, cluster_name):
    with node_with_settings(request, tmp_path_factory, etcd, cluster_name, LIMITS) as proc:
        yield proc


def _connect(node) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=30)


def _answer(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """What the server sends until it closes the connection (b"" if it closes without a word)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("sent", [b"", b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Half: "])
def test_idle_and_half_sent_heads_are_closed_after_the_header_timeout(node, sent):
    with _connect(node) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        answer = _answer(sock)
        waited = time.monotonic() - started
    assert answer in (b"",) or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert HEADER_TIMEOUT - 0.5 <= waited < HEADER_TIMEOUT + 5


def _send_huge_head(node, answers: list[bytes]) -> None:
    with _connect(node) as sock:
        try:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(256):                             # 16 MiB, 64 KiB at a time
                sock.sendall(b"a" * 65536)
        except OSError:          # refused half way: the server closed the connection
            pass
        answers.append(_answer(sock, 5))


def test_a_16_mib_head_is_refused_without_memory_growth(node):
    before = _rss_kib(node.pid)
    answers: list[bytes] = []
    threads = [threading.Thread(target=_send_huge_head, args=(node, answers)) for _ in range(MAX_CONNECTIONS - 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == MAX_CONNECTIONS - 2
    assert all(a == b"" or a.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")) for a in answers), answers
    grown_mib = (_rss_kib(node.pid) - before) / 1024
    assert grown_mib < 40, f"the node grew by {grown_mib:.0f} MiB"
    assert httpx.get(node.url + "/v2/", timeout=10).status_code == 200


def test_connections_beyond_the_cap_are_refused_with_503(node):
    held = [_connect(node) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)                        # all of them accepted by the server
        with _connect(node) as extra:
            extra.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = _answer(extra, 10)
        assert answer.startswith(b"HTTP/1.1 503") and b"TOOMANYREQUESTS" in answer, answer[:300]
    finally:
        for sock in held:
            sock.close()
    until(lambda: httpx.get(node.url + "/v2/", timeout=10).status_code == 200,
          what="the cap frees up when the connections close")


def test_a_trickling_upload_body_is_cut_by_the_minimum_rate(node):
    started = httpx.post(node.url + "/v2/slow/body/blobs/uploads/", timeout=10)
    assert started.status_code == 202
    location = started.headers["location"]
    with _connect(node) as sock:
        sock.sendall(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: 100\r\n\r\n".encode())
        sock.settimeout(1.0)
        begun = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - begun < 12:      # a byte a second: never idle for 2 s
            try:
                sock.sendall(b"x")
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
        cut_after = time.monotonic() - begun
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert cut_after < BODY_TIMEOUT + 4
