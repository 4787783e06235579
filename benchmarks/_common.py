"""Helpers shared by the benchmark scripts: entry sizes, per-call timing, and the usual ways of
moving a tensor between processes (``multiprocessing.Manager().dict()``, a
``torch.multiprocessing.Queue``), measured the same way everywhere."""

from __future__ import annotations

import gc
import multiprocessing as mp
import statistics
import time
from typing import Callable, Dict

import torch
import torch.multiprocessing as tmp

from concurrent_kv import EntrySpec
from concurrent_kv.workload import fill_entry

SIZES = {
    "8KiB": EntrySpec(2, 1, 2, 8, 32),  # CartPole
    "96KiB": EntrySpec(2, 1, 8, 8, 96),  # Atari default
    "1.27MiB": EntrySpec(4, 1, 4, 162, 64),  # Memory env
}


def latency(fn: Callable[[], object], n: int, warmup: int = 50) -> Dict[str, float]:
    """Time ``n`` calls of ``fn`` one by one (``perf_counter_ns`` around each call, garbage
    collector off as in ``timeit``): p50, p99 and mean in microseconds, and calls per second."""
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


def p50_us(fn: Callable[[], object], n: int) -> float:
    """Median per-call time of ``fn`` in microseconds."""
    return latency(fn, n)["p50_us"]


def manager_dict_ops(spec: EntrySpec, n: int) -> Dict[str, Dict[str, float]]:
    """``multiprocessing.Manager().dict()`` set and get of one entry's tensor (per-call latency)."""
    with mp.Manager() as m:
        d = m.dict()
        t = fill_entry(spec.empty_entry(), 7)._block
        d[7] = t
        return {"set": latency(lambda: d.__setitem__(7, t), n, warmup=10),
                "get": latency(lambda: d[7], n, warmup=10)}


def manager_dict(spec: EntrySpec, n: int) -> Dict[str, float]:
    """p50 of ``manager_dict_ops`` (us)."""
    ops = manager_dict_ops(spec, n)
    return {"set": ops["set"]["p50_us"], "get": ops["get"]["p50_us"]}


def _queue_producer(q, done, spec: EntrySpec, n: int) -> None:
    torch.set_num_threads(1)
    for _ in range(n + 20):
        q.put(torch.full(spec.block_shape, 1.0))  # a new tensor per item, as a collector makes
    q.put(None)
    done.wait(60)  # the fd strategy needs the sender alive until every item is received


def torch_queue(spec: EntrySpec, n: int) -> float:
    """Per-item time (us) of tensors sent through torch.multiprocessing.Queue (consumer side)."""
    ctx = tmp.get_context("fork")
    q = ctx.Queue(maxsize=64)
    done = ctx.Event()
    proc = ctx.Process(target=_queue_producer, args=(q, done, spec, n))
    proc.start()
    try:
        for _ in range(20):
            q.get()
        start = time.perf_counter()
        count = 0
        while q.get() is not None:
            count += 1
        elapsed = time.perf_counter() - start
    finally:
        done.set()
        proc.join(30)
    return elapsed / max(1, count) * 1e6
