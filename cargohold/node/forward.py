"""Forwarding upload requests to the node that owns the session.

An upload session lives on the node that created it (its bytes are on that node's disk). Its
id ends with a tag of the owner's node id, so any node behind a round-robin load balancer can
tell whose it is without asking etcd, and relays the request there over HTTP, streaming the
body both ways.
"""

from __future__ import annotations

import hashlib
from typing import AsyncIterator, Callable

import httpx

from cargohold.oci import errors
from cargohold.node.http import Request, Response

FORWARDED_HEADER = "x-cargohold-forwarded-by"
# Hop-by-hop headers (RFC 9110 7.6.1) and ones the relay recomputes.
_DROP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
         "proxy-connection", "content-length", "docker-distribution-api-version"}


def owner_tag(node_id: str) -> str:
    """Eight hex characters naming a node inside upload ids."""
    return hashlib.blake2b(node_id.encode(), digest_size=4).hexdigest()


class UploadForwarder:
    def __init__(self, node_id: str, members: Callable[[], dict[str, str]], timeout: float = 300.0):
        """`members()` maps the node ids of live members to their HTTP URLs."""
        self.node_id = node_id
        self.tag = owner_tag(node_id)
        self._members = members
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0))

    async def aclose(self) -> None:
        await self._client.aclose()

    def owner_url(self, tag: str) -> str | None:
        for node_id, url in self._members().items():
            if owner_tag(node_id) == tag:
                return url
        return None

    async def forward(self, request: Request, tag: str, upload_id: str) -> Response:
        if request.header(FORWARDED_HEADER):
            # Already relayed once: the owner does not know it. Never bounce between nodes.
            raise errors.blob_upload_unknown(detail={"uuid": upload_id})
        url = self.owner_url(tag)
        if url is None:
            raise errors.blob_upload_unknown("the node that holds this upload is gone; start the upload again",
                                             detail={"uuid": upload_id})
        headers = [(k, v) for k, v in _request_headers(request) if k not in _DROP]
        headers.append((FORWARDED_HEADER, self.node_id))
        query = request.scope.get("query_string", b"").decode("latin-1")
        target = f"{url}{request.path}" + (f"?{query}" if query else "")
        declared = request.header("content-length")
        if declared is not None:
            headers.append(("content-length", declared))
        body = request.body_chunks() if request.method in ("PATCH", "PUT", "POST") else None
        upstream = self._client.build_request(request.method, target, headers=headers, content=body)
        try:
            reply = await self._client.send(upstream, stream=True)
        except httpx.HTTPError:
            raise errors.blob_upload_unknown("the node that holds this upload is unreachable; start again",
                                             detail={"uuid": upload_id}) from None
        response = Response(reply.status_code, stream=_relay(reply),
                            length=int(reply.headers["content-length"]) if "content-length" in reply.headers else None)
        for name, value in reply.headers.items():
            if name.lower() not in _DROP:
                response.header(name, value)
        return response


def _request_headers(request: Request):
    for name, value in request.scope["headers"]:
        yield name.decode("latin-1").lower(), value.decode("latin-1")


async def _relay(reply: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in reply.aiter_raw():
            yield chunk
    finally:
        await reply.aclose()
