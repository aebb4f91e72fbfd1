"""Benchmarks of cacheagent against Triton's own cloud loading (see bench/README.md)."""
