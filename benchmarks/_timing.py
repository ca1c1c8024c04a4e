"""The timing rule every benchmark shares.

Each repeat times every contender once, in turn, so that load from other processes on a shared
machine falls on all of them alike; the reported figure is the median over repeats. The minima
come back too: on a contended machine the minimum estimates the uncontended cost.
"""
from __future__ import annotations

import time

import numpy as np


def interleaved_ms(fns: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """({name: median ms}, {name: min ms}) of each zero-argument function in ``fns``."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    medians = {k: 1e3 * float(np.median(v)) for k, v in ts.items()}
    minima = {k: 1e3 * float(np.min(v)) for k, v in ts.items()}
    return medians, minima
