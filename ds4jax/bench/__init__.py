"""Benchmarks: single process vs split over local workers, the wire, memory, HF eager.

`scripts/bench.py` drives it; each configuration runs in a fresh process (`child.py`) so
peak RSS and compile time belong to that configuration alone.
"""
