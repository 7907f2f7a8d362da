"""The OCI Distribution error model: one exception type that knows its code and status."""

from __future__ import annotations

import json


class RegistryError(Exception):
    """An error answered to the client as the spec's JSON error body."""

    def __init__(self, code: str, message: str, status: int, detail: object = None,
                 headers: dict[str, str] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


def _factory(code: str, status: int, default_message: str):
    def make(message: str = default_message, detail: object = None, *, status: int = status,
             headers: dict[str, str] | None = None) -> RegistryError:
        return RegistryError(code, message, status, detail, headers)

    make.__name__ = code.lower()
    return make


blob_unknown = _factory("BLOB_UNKNOWN", 404, "blob unknown to registry")
blob_upload_invalid = _factory("BLOB_UPLOAD_INVALID", 400, "blob upload invalid")
blob_upload_unknown = _factory("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry")
digest_invalid = _factory("DIGEST_INVALID", 400, "provided digest did not match uploaded content")
manifest_blob_unknown = _factory("MANIFEST_BLOB_UNKNOWN", 400, "manifest references a blob unknown to the registry")
manifest_invalid = _factory("MANIFEST_INVALID", 400, "manifest invalid")
manifest_unknown = _factory("MANIFEST_UNKNOWN", 404, "manifest unknown to registry")
name_invalid = _factory("NAME_INVALID", 400, "invalid repository name")
name_unknown = _factory("NAME_UNKNOWN", 404, "repository name not known to registry")
size_invalid = _factory("SIZE_INVALID", 400, "provided length did not match content length")
range_invalid = _factory("BLOB_UPLOAD_INVALID", 416, "requested range not satisfiable")
unsupported = _factory("UNSUPPORTED", 405, "the operation is unsupported")
denied = _factory("DENIED", 403, "requested access to the resource is denied")
unavailable = _factory("UNAVAILABLE", 503, "the registry's metadata store is unavailable")
# No spec code names "no such route"; UNSUPPORTED ("missing implementation or invalid set of
# parameters") is the spec's closest, and clients only look at the status anyway.
not_found = _factory("UNSUPPORTED", 404, "no such route")
