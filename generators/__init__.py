"""Deterministic generators of raw retail and taxi events, for demos, tests and benchmarks."""
