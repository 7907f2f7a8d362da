"""A slow network link on loopback: a TCP proxy whose server-to-client direction shares one
bandwidth budget across all its connections, as the one internet link between a site and a
remote registry does. The bytes are copied by threads, 64 KiB at a time; at tens of MB/s that
costs little CPU next to the servers'. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 64 * 1024


class Link:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:`target_port`; downloads share `mb_per_s`
    (10^6 bytes per second) in arrival order. A context manager; `close` cuts every connection."""

    def __init__(self, target_port: int, mb_per_s: float):
        self.target_port = target_port
        self.seconds_per_byte = 1 / (mb_per_s * 1e6)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._free_at = 0.0               # when the link has sent everything handed to it so far
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        with self._lock:
            sockets, self._open = self._open, set()
        for s in sockets:
            _close(s)

    def _take(self, size: int) -> None:
        """Wait until `size` more bytes have had their turn on the link."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + size * self.seconds_per_byte
            wait = self._free_at - now
        time.sleep(wait)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            self._connect(client, server)

    def _connect(self, client: socket.socket, server: socket.socket) -> None:
        """One thread per direction; the last one to finish closes both sockets."""
        with self._lock:
            self._open |= {client, server}
        done = threading.Barrier(2, action=lambda: self._forget(client, server))
        threading.Thread(target=self._pipe, args=(client, server, False, done), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, client, True, done), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, throttled: bool, done: threading.Barrier) -> None:
        try:
            while data := source.recv(CHUNK):
                if throttled:
                    self._take(len(data))
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)        # pass the end of one direction on
        except OSError:
            _close(source)
            _close(sink)
        try:
            done.wait()
        except threading.BrokenBarrierError:
            pass

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._open -= set(sockets)
        for s in sockets:
            _close(s)


def _close(s: socket.socket) -> None:
    """Shut down first: that wakes a thread blocked in recv on it, which close alone may not."""
    for end in (lambda: s.shutdown(socket.SHUT_RDWR), s.close):
        try:
            end()
        except OSError:
            pass
