"""Benchmarks: speed (fasterdiff vs stock and other accelerators)."""
