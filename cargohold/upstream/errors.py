"""What an upstream call can fail with, sorted by what a cache does about it.

Messages name the upstream, the repository and the status, never credentials or tokens."""

from __future__ import annotations


class UpstreamError(Exception):
    """Any failure talking to the upstream registry."""


class UpstreamNotFound(UpstreamError):
    """The upstream answered 404: the repository, manifest or blob does not exist there."""


class UpstreamDenied(UpstreamError):
    """The upstream refused us (401 after the auth flow, or 403): credentials or access rules."""


class UpstreamUnavailable(UpstreamError):
    """The upstream cannot answer now (5xx, refused connection, timeout, TLS failure, or assumed
    offline): a cache serves what it has. `reason` is short and safe to log; `status` is the
    upstream's 5xx when it answered one (None: it did not answer)."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class UpstreamRateLimited(UpstreamUnavailable):
    """429 Too Many Requests; `retry_after` in seconds when the upstream said (else None)."""

    def __init__(self, reason: str, retry_after: float | None):
        super().__init__(reason)
        self.retry_after = retry_after


class DigestMismatch(UpstreamError):
    """The upstream's bytes do not hash to the digest they were asked for or announced."""


def outcome_label(exc: BaseException) -> str:
    """A short, bounded label for how an upstream call failed (metrics, audit, fill claims)."""
    for kind, label in ((UpstreamNotFound, "not_found"), (UpstreamRateLimited, "rate_limited"),
                        (UpstreamUnavailable, "unavailable"), (UpstreamDenied, "denied"),
                        (DigestMismatch, "mismatch")):
        if isinstance(exc, kind):
            return label
    return "error"
