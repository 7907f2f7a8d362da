"""Blob GET with one chunk of read-ahead: the next file read runs in a worker thread while
the current chunk is being written to the socket (asyncio runtime only)."""
import asyncio

import anyio

from cargohold.oci import errors
from cargohold.blobs import store as storage


def apply():
    async def read(self, digest, offset=0, length=None):
        try:
            f = await anyio.to_thread.run_sync(open, self.path_of(digest), "rb")
        except FileNotFoundError:
            raise errors.blob_unknown(detail={"digest": str(digest)}) from None
        loop = asyncio.get_running_loop()
        pending = None
        try:
            if offset:
                f.seek(offset)
            remaining = length

            def submit():
                want = storage.READ_CHUNK if remaining is None else min(storage.READ_CHUNK, remaining)
                return loop.run_in_executor(None, f.read, want) if want > 0 else None

            pending = submit()
            while pending is not None:
                chunk = await pending
                pending = None
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                pending = submit()
                yield chunk
        finally:
            if pending is not None:
                await asyncio.wait([pending])
            f.close()

    storage.FilesystemBlobStore.read = read
