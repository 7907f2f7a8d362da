"""Blob GET reading the file on the event-loop thread (no thread hop per chunk).
Blocking, so not a fix as such: it measures what the per-chunk thread round trip costs."""
from cargohold.oci import errors
from cargohold.blobs import store as storage


def apply():
    async def read(self, digest, offset=0, length=None):
        try:
            f = open(self.path_of(digest), "rb")
        except FileNotFoundError:
            raise errors.blob_unknown(detail={"digest": str(digest)}) from None
        try:
            if offset:
                f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                want = storage.READ_CHUNK if remaining is None else min(storage.READ_CHUNK, remaining)
                chunk = f.read(want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            f.close()

    storage.FilesystemBlobStore.read = read
