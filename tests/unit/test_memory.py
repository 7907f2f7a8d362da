"""The allocator settings of the node process (cargohold.runtime.memory), checked by what they are
for: freeing and allocating 1 MiB buffers again must not fault fresh pages in every time."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
from cargohold.runtime import memory
applied = memory.keep_large_buffers() if sys.argv[1] == "tuned" else False
def round():                        # eight 1 MiB pieces in flight, then all freed
    pieces = [bytearray(1 << 20) for _ in range(8)]
    for piece in pieces:
        piece[::4096] = b"x" * 256  # every page touched
round()                             # warm up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(50):
    round()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_are_reused_without_new_page_faults():
    default, tuned = probe("default"), probe("tuned")
    if not tuned["applied"]:
        pytest.skip("no glibc mallopt here")
    assert default["faults"] >= 50 * 8 * 100      # most 1 MiB pieces fault in fresh pages (256 each)
    assert tuned["faults"] < 50 * 8 * 5           # the same heap memory, already mapped


def test_an_operators_own_malloc_settings_are_kept(monkeypatch):
    from cargohold.runtime import memory

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert memory.keep_large_buffers() is False
