"""The one way this package times things: ``time.perf_counter_ns`` around each call for
per-call latency, ``time.perf_counter`` around a whole batch for throughput. Both give rows of
the same shape (n, p50_us, p99_us, mean_us, ops_per_s)."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable, Dict, Optional

Stats = Dict[str, Any]

#: The clock of every batch and deadline (throughput runs, worker loops).
now = time.perf_counter


def latency(fn: Callable[[], object], n: int, warmup: int = 50) -> Stats:
    """Time ``n`` calls of ``fn`` one by one after ``warmup`` untimed calls, the garbage
    collector off (as ``timeit`` does): p50, p99 and mean in microseconds, and calls per second."""
    for _ in range(min(warmup, n)):
        fn()
    times = [0] * n
    clock = time.perf_counter_ns
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(n):
            t0 = clock()
            fn()
            times[i] = clock() - t0
    finally:
        if was_enabled:
            gc.enable()
    times.sort()
    mean_ns = sum(times) / n
    return {
        "n": n,
        "p50_us": statistics.median(times) / 1000,
        "p99_us": times[min(n - 1, int(round(0.99 * (n - 1))))] / 1000,
        "mean_us": mean_ns / 1000,
        "ops_per_s": 1e9 / mean_ns if mean_ns else float("inf"),
    }


def batch(count: int, elapsed_s: float) -> Stats:
    """Per-item figures of ``count`` items timed as one batch (no per-item spread: p99 is None)."""
    per_item_us = elapsed_s / max(1, count) * 1e6
    return {"n": count, "p50_us": per_item_us, "p99_us": None, "mean_us": per_item_us,
            "ops_per_s": 1e6 / per_item_us if per_item_us else float("inf")}


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.elapsed_s``: wall time of a batch."""

    def __init__(self) -> None:
        self._start: Optional[float] = None
        self.elapsed_s = 0.0

    def __enter__(self) -> "Stopwatch":
        self._start = now()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        self.elapsed_s = now() - self._start


def timer_overhead_us() -> float:
    """p50 of timing an empty call: what every latency figure includes (not subtracted)."""
    return latency(lambda: None, 20000)["p50_us"]


NOTES = [
    "Latency: perf_counter_ns around each call, p50/p99 of n calls after 50 warm-up calls, garbage collector "
    "off while timing, 1 torch intra-op thread; the timer's own overhead (meta.timer_overhead_us) is not subtracted.",
]
