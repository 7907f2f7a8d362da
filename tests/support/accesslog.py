"""Reading a registry's own access log in a test, once it has caught up."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from tests.support.poll import until


def settled_log(url: str, log_path: Path) -> str:
    """The log once every request answered so far is in it. Registries (cargohold, Distribution)
    write an access line just after the answer, so a count read at once can miss the last one:
    send a marker request now and wait for it to show up."""
    marker = f"/v2/log-marker-{uuid.uuid4().hex}/tags/list"
    httpx.get(url + marker, timeout=10)

    def log_with_marker() -> str | None:
        text = log_path.read_text(errors="replace")
        return text if marker in text else None

    return until(log_with_marker, what=f"the marker request in {log_path}")
