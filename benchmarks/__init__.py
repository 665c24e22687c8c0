"""Benchmark scripts (run them as python -m benchmarks.<name>); see each script's docstring."""
