"""Timing shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this directory is
on sys.path)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int, *, warm_up: bool = False) -> float:
    """The median wall time of ``repeats`` calls of ``fn``; ``warm_up`` first calls it once untimed
    (first-call allocations and kernel selection), where a cold first call is not the figure wanted."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
