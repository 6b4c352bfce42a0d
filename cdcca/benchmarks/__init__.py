"""Benchmarks behind ``cdcca bench``; results are committed under ``bench/results/``."""
