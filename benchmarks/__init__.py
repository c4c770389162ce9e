"""Benchmarks, run as modules from the repository root (`python -m benchmarks.pipeline`, or `make pipeline`):
each measures its figures as ratios within one run and prints them as one JSON object on its last line."""
