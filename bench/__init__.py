"""cargohold's benchmarks: `python -m bench SCENARIO [options]`, `python -m bench --list`."""
