"""Benchmarks (not tests): timings measured against a baseline taken in the same run."""
