"""Benchmark scripts. Run from the repository root as `python benchmarks/<name>.py` (or `python -m
benchmarks.<name>`); each prints a table and writes results/<name>.json (and a PNG where there are curves)."""
