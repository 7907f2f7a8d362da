"""One module per scenario (see `SCENARIOS` in bench/harness.py); the others are their helpers."""
