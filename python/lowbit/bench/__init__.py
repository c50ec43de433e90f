"""Benchmarks and tuning as a library: ``lowbit.bench.run`` (``lowbit bench``) and
``lowbit.bench.tune`` (``lowbit tune``). bench/cpu.py and the RESULTS tables use this one
code path."""

from lowbit.bench.runner import BASELINE, DEFAULT_M, INT8_BASELINE, READ, READ_MAX_M, BenchResult, Bound, Row, run
from lowbit.bench.shapes import SHAPE_SETS, parse_shapes
from lowbit.bench.timing import Ceilings, median_seconds
from lowbit.bench.tune import tune

__all__ = ["BASELINE", "DEFAULT_M", "INT8_BASELINE", "READ", "READ_MAX_M", "SHAPE_SETS", "BenchResult", "Bound",
           "Ceilings", "Row", "median_seconds", "parse_shapes", "run", "tune"]
