"""Benchmarks and profiling scripts of bcr; run the scripts as modules (``python -m benchmarks.profile_step``)."""
