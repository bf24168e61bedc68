"""Benchmarks and the scale-data generator they run on (data goes under ``.mlops/``)."""
