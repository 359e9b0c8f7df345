"""Offline tools over the runtime: calibration, benchmarks and analysis, the trained
stand-in, tiny test pipelines and plots. Each imports the runtime (``fasterdiff``); the
runtime imports none of them."""
