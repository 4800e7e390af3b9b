"""Benchmarks: qmotion side by side with its baselines, in one run on one machine."""
