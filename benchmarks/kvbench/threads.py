"""The threads section: how far threads can scale a pool under the GIL. Two threads against one,
on one pool and on one pool per thread (no lock in common), for a bare ``copy_``, get(out=), set
and a 1:1 mix. The "own pools" figure is the ceiling for any locking scheme: what remains there
is the GIL (every call runs a few microseconds of Python, and each torch copy hands the GIL over
and takes it back)."""

from __future__ import annotations

import threading
from functools import partial
from typing import List

from concurrent_kv import KVCachePool

from .fixtures import fill_pool, filled
from .results import Row
from .settings import SIZES, Settings, Task
from .timing import Stopwatch

SLOTS = 400  # UniZero's recur pool for 8 envs x 50 sims
OPS = ("copy_", "get", "set", "mix")


def calls_per_s(threads: int, op: str, lock: str, own_pools: bool, calls: int, size: str) -> float:
    """Total calls/s of ``threads`` threads making ``calls`` calls each, started together."""
    spec = SIZES[size]
    pools = [KVCachePool(SLOTS, lock=lock, entry_spec=spec) for _ in range(threads if own_pools else 1)]
    stored = filled(size, 7)
    for pool in pools:
        fill_pool(pool, stored, SLOTS)
    start = threading.Barrier(threads + 1)

    def body(i: int) -> None:
        pool = pools[i % len(pools)]
        out, src = spec.empty_entry(), filled(size, 9)
        start.wait()
        for j in range(calls):
            key = (i * SLOTS // 2 + j) % SLOTS  # threads start half a pool apart
            if op == "copy_":
                out._block.copy_(src._block)
            elif op == "get" or (op == "mix" and j % 2):
                pool.get(key, out=out)
            else:
                pool.set(key, src)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    with Stopwatch() as sw:
        for w in workers:
            w.join()
    for pool in pools:
        pool.close()
    return threads * calls / sw.elapsed_s


def measure_threads(size: str, op: str, lock: str, calls: int) -> Row:
    one = calls_per_s(1, op, lock, False, calls, size)
    one_pool = calls_per_s(2, op, lock, False, calls, size)
    own_pools = calls_per_s(2, op, lock, True, calls, size)
    return {"size": size, "op": op, "lock": "-" if op == "copy_" else lock, "calls_per_thread": calls,
            "one_thread_calls_per_s": one, "x_two_threads_one_pool": one_pool / one,
            "x_two_threads_own_pools": own_pools / one}


def threads_tasks(s: Settings) -> List[Task]:
    tasks = []
    for size in s.micro_sizes:
        for op in OPS:
            for lock in ("rw",) if op == "copy_" else ("rw", "mutex"):  # a bare copy_ takes no lock
                tasks.append(Task("threads", "rows", f"threads {size} {op} {lock}",
                                  partial(measure_threads, size, op, lock, s.threads_calls)))
    return tasks
