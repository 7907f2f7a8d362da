"""Numbers and byte ranges from request headers (Range, Content-Range, Content-Length), free of I/O.

Every number is read with `decimal`: a header may carry thousands of digits, which Python's
`int()` refuses (ValueError past 4,300 digits) and which no real size needs. Numbers beyond
`SATURATED` are read as `SATURATED`, larger than any blob, so the ordinary checks answer
(416, 413) instead of a crash.
"""

from __future__ import annotations

import re

from cargohold.oci import errors

SATURATED = 10 ** 18            # no blob is this large (~888 PiB): stands for "too large"
_MAX_DIGITS = 18

_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?$", re.ASCII)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$", re.ASCII)


def decimal(text: str | None) -> int | None:
    """A non-negative decimal number (ASCII digits only), capped at SATURATED; None otherwise."""
    if text is None or not text or not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else SATURATED


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The byte range (first, last) a GET asks for, or None to serve the whole blob.

    RFC 9110 14.2: a Range with a unit we do not know is ignored, and we may ignore a
    multi-range request (serving all of it is always correct).
    """
    header = header.strip()
    if not header.startswith("bytes=") or "," in header:
        return None
    match = _RANGE.match(header)
    if not match or (not match.group(1) and not match.group(2)):
        raise unsatisfiable(size)
    first, last = decimal(match.group(1)), decimal(match.group(2))
    if first is None:  # suffix range: the last N bytes
        if last == 0:
            raise unsatisfiable(size)
        start, end = max(size - last, 0), size - 1
    else:
        start = first
        end = min(last, size - 1) if last is not None else size - 1
    if start >= size or start > end:
        raise unsatisfiable(size)
    return start, end


def unsatisfiable(size: int) -> errors.RegistryError:
    return errors.unsupported("requested range not satisfiable", status=416,
                              headers={"Content-Range": f"bytes */{size}"})


def parse_chunk_range(content_range: str | None, content_length: str | None) -> tuple[int | None, int | None]:
    """(start, length) of an upload chunk from Content-Range and Content-Length; 416 when malformed."""
    length = decimal(content_length)
    if content_range is None:
        return None, length
    match = _CONTENT_RANGE.match(content_range.strip())
    if not match:
        raise errors.range_invalid(f"malformed Content-Range {content_range[:80]!r}")
    start, end = decimal(match.group(1)), decimal(match.group(2))
    if end >= SATURATED or end < start or (length is not None and length != end - start + 1):
        raise errors.range_invalid(f"Content-Range {content_range[:80]!r} does not match the body length")
    return start, end - start + 1
