"""Sourcebeam's benchmarks: each compares rates measured in the same run, never absolute times."""
