"""Issue 13: what one node acknowledged, another node serves at once, even while its read model
lags behind (the manifest record, the manifest's own content and its blobs alike)."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import client_for
from tests.support import oci

pytestmark = pytest.mark.anyio

ROUNDS = 100


async def test_push_through_a_then_pull_through_b_at_once_never_fails(cluster):
    a, b, _ = (cluster.add(n) for n in ("a", "b", "c"))
    failures = []
    async with client_for(a) as pusher, client_for(b) as puller:
        for round_ in range(ROUNDS):
            image = oci.build_image(f"ryw-{round_}", layers=1, layer_size=512)
            await oci.push_image(pusher, "ryw/app", None, image)
            r = await puller.get(f"/v2/ryw/app/manifests/{image.digest}", headers={"Accept": image.media_type})
            if r.status_code != 200 or r.content != image.manifest:
                failures.append(f"round {round_} manifest: {oci.describe(r)}")
            for digest, data in image.all_blobs().items():
                r = await puller.get(f"/v2/ryw/app/blobs/{digest}")
                if r.status_code != 200 or r.content != data:
                    failures.append(f"round {round_} blob {digest}: {oci.describe(r)}")
    assert failures == []
