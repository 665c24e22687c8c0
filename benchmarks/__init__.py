"""Benchmark scripts (run them as python benchmarks/<name>.py); see each script's docstring."""
