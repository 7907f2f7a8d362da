"""A TCP proxy on loopback that cuts connections after a number of bytes (a flaky network link),
or all of them until healed (a partition), and can throttle what goes to the client (a slow link,
also the bench's: `bench/link.py`). Nothing leaves 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time


class FaultProxy:
    """Forwards 127.0.0.1:<port> to `target`. The first `cut_connections` connections are closed
    after `cut_after` bytes have gone from the target to the client. `partition()` resets every
    open connection and closes new ones as soon as they are accepted (what a partition with a
    router that answers looks like: connection refused or reset) until `heal()`. With `rate`, what
    goes from the target to the clients shares that many bytes a second across all connections,
    in arrival order, as the one internet link between a site and a remote registry does."""

    def __init__(self, target_port: int, *, cut_after: int, cut_connections: int = 1, rate: float | None = None):
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts_left = cut_connections
        self.cuts_made = 0
        self.rate = rate
        self._free_at = 0.0       # with `rate`: when the link has sent everything handed to it so far
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._budget: int | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._partitioned = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, cut_after: int) -> None:
        """Cut whichever connection (open or new) next carries `cut_after` bytes to the client."""
        with self._lock:
            self._budget = cut_after

    def partition(self) -> None:
        with self._lock:
            self._partitioned = True
            sockets, self._open = self._open, set()
        for s in sockets:
            _close(s)

    def heal(self) -> None:
        with self._lock:
            self._partitioned = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop accepting and cut every open connection."""
        self._closed = True
        _close(self._listener)        # (shut down first: that wakes the accepting thread)
        with self._lock:
            sockets, self._open = self._open, set()
        for s in sockets:
            _close(s)

    def _take(self, size: int) -> None:
        """Wait until `size` more bytes have had their turn on the throttled link."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + size / self.rate
            wait = self._free_at - now
        time.sleep(wait)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                partitioned = self._partitioned
                self.connections += 1
                cut = self.cuts_left > 0
                if cut:
                    self.cuts_left -= 1
            if partitioned:
                _close(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open.update((client, upstream))
            limit = self.cut_after if cut else None
            threading.Thread(target=self._pipe, args=(client, upstream, None, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit, True), daemon=True).start()

    def _armed_cut(self, size: int) -> int | None:
        """With the proxy armed, how many of the next `size` bytes may pass before the cut."""
        with self._lock:
            if self._budget is None:
                return None
            if size < self._budget:
                self._budget -= size
                return None
            allowed, self._budget = self._budget, None
            return allowed

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None, to_client: bool) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                allowed = self._armed_cut(len(data)) if to_client else None
                if allowed is not None:
                    sink.sendall(data[:allowed])
                    with self._lock:
                        self.cuts_made += 1
                    break
                if limit is not None and sent + len(data) >= limit:
                    sink.sendall(data[: max(limit - sent, 0)])
                    with self._lock:
                        self.cuts_made += 1
                    break
                if to_client and self.rate:
                    self._take(len(data))
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                _close(s)
            with self._lock:
                self._open.difference_update((source, sink))


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
