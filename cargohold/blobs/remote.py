"""Content this node does not hold: the interface the HTTP API reads it through.

The API asks `RemoteContent` whether some node can serve a blob, streams it, and (for
--min-copies / --sync-sites) waits until enough nodes hold it; the pull-through cache follows
through it a blob another node is filling from an upstream (`follow_fill`). The implementation
over gRPC peers is `cargohold.replication.remote.PeerContent`; the protocol lives here, beside
`BlobStore`, so that the API and the pull-through cache depend on the interface and never on
the replication package.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol


class ContentUnavailable(Exception):
    """No reachable node holds the blob."""


class FollowedFill(Protocol):
    """A blob another node is filling from an upstream, readable while it arrives there."""
    size: int

    def read(self, start: int, length: int) -> AsyncIterator[bytes]:
        """`length` bytes from `start` as that node releases them (the last byte only once it
        verified the digest); ContentUnavailable when the fill fails or that node goes away,
        so a response built on it ends short rather than complete and wrong."""


class RemoteContent(Protocol):
    async def can_read(self, digest: str) -> bool:
        """Whether some live peer publishes a copy (checked before a response starts)."""

    def read(self, digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """Stream `length` bytes from `offset`; ContentUnavailable when no holder can serve them."""

    async def read_all(self, digest: str, size: int) -> bytes:
        """The whole blob, verified against its digest; ContentUnavailable otherwise."""

    async def wait_for_copies(self, digest: str, copies: int, timeout: float) -> bool:
        """Until `copies` nodes publish a copy; False at the timeout."""

    async def wait_for_sites(self, digest: str, other_sites: int, timeout: float) -> bool:
        """Until `other_sites` sites besides ours hold a copy (or as many as the rules allow)."""

    async def follow_fill(self, node_id: str, digest: str) -> FollowedFill | None:
        """The fill of `digest` in progress on node `node_id`, once that node knows its size;
        None when there is none to follow there (it ended, is not reachable, or is busy)."""
