"""A node with settings of its own (short limits, so the tests take seconds, not minutes)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from tests.support.node import NodeProcess


@contextmanager
def node_with_settings(request, tmp_path_factory, etcd, cluster_name: str, settings: str) -> Iterator[NodeProcess]:
    """A started node on the runtime `request.param`, with `settings` (YAML) as its config file."""
    runtime = request.param
    data_dir = tmp_path_factory.mktemp(f"node-{runtime}")
    config = data_dir / "settings.yaml"
    config.write_text(settings)
    proc = NodeProcess(data_dir, etcd_url=etcd.url, cluster=f"{cluster_name}-{runtime}", node_id="n1",
                       runtime=runtime, extra_args=["--config", str(config)])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
