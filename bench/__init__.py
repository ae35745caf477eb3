"""Benchmarks: run with ``python -m bench.<name>``. Not tests: they report, they do not assert."""
