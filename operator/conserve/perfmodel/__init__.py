"""Measured serving times and power, and how far core/perf.py's model is from them (`conserve perf-model`)."""
