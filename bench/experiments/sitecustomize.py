"""One-off probes: patch a running cargohold node to test a hypothesis (never committed code
paths of cargohold; nothing here changes the package on disk).

    PYTHONPATH=bench/experiments CARGOHOLD_BENCH_EXPERIMENT=readahead \
        /work/venv/bin/python bench/run.py --only blob_parallel

bench/run.py passes PYTHONPATH on to the node; this file is imported at interpreter start-up
(Python's sitecustomize hook) and applies bench/experiments/<name>.py to the node process only.
"""
import os
import sys

_name = os.environ.get("CARGOHOLD_BENCH_EXPERIMENT")
if _name and sys.orig_argv[1:3] == ["-m", "cargohold"]:
    import importlib
    importlib.import_module(f"exp_{_name}").apply()
    print(f"EXPERIMENT {_name} applied", file=sys.stderr)
