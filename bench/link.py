"""A slow network link on loopback for the bench: `tests/support/faultproxy.FaultProxy` with its
server-to-client direction throttled to one bandwidth shared by all connections (as the one
internet link between a site and a remote registry), and nothing cut. The bytes are copied by
threads, 64 KiB at a time; at tens of MB/s that costs little CPU next to the servers'."""

from __future__ import annotations

from tests.support.faultproxy import FaultProxy


class Link(FaultProxy):
    """Forwards 127.0.0.1:<port> to 127.0.0.1:`target_port`; downloads share `mb_per_s`
    (10^6 bytes per second). A context manager; `close` cuts every connection."""

    def __init__(self, target_port: int, mb_per_s: float):
        super().__init__(target_port, cut_after=0, cut_connections=0, rate=mb_per_s * 1e6)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
