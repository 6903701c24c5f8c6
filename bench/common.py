"""Timing helpers and the hardware limit (measured peak float32 matmul rate)."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=1)
def peak_gflops(n: int = 1024, repeat: int = 5) -> float:
    """Measured float32 matmul rate (GFLOP/s) at the current torch thread count: the hardware limit we compare to."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t = timeit(lambda: a @ b, repeat=repeat, warmup=2)
    return 2 * n**3 / t / 1e9


def pct_of_peak(gflop: float | None, seconds: float) -> float | None:
    """Achieved fraction of the peak matmul rate, in percent."""
    if gflop is None or seconds <= 0:
        return None
    return 100.0 * gflop / seconds / peak_gflops()


def row(
    benchmark: str,
    case: str,
    ours_s: float,
    peer: str = "",
    peer_s: float | None = None,
    gflop: float | None = None,
    note: str = "",
) -> dict:
    """One result row in the shared format."""
    return {
        "benchmark": benchmark,
        "case": case,
        "ours_s": ours_s,
        "peer": peer,
        "peer_s": peer_s,
        "ratio": (ours_s / peer_s) if peer_s else None,
        "gflop": gflop,
        "pct_peak": pct_of_peak(gflop, ours_s),
        "note": note,
    }
