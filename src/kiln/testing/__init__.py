"""Helpers for kiln's own tests and benchmarks (not used by the daemon)."""
