"""The benchmarks of concurrent_kv, as a package: ``python -m benchmarks.kvbench`` (see kvbench)."""
