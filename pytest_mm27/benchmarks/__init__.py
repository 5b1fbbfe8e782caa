"""Benchmarks of the harness itself (not tests): ``python -m pytest_mm27.benchmarks.gate_accuracy``."""
