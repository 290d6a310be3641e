"""Benchmarks: measured and printed, never asserted (speed is no test). See BENCHMARKS.md."""
