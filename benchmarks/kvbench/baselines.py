"""The baselines section: what else could hold the entries. In-process: LightZero's legacy ring
pool, a dict + ``threading.Lock`` of clones, ``cachetools.LRUCache`` + lock; across processes:
``Manager().dict()``, ``torch.multiprocessing.Queue`` and Ray put + get. Optional packages
(cachetools, ray: the ``bench`` extra) are measured when importable, else reported as skipped."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import multiprocessing as mp
import queue
import threading
from functools import partial
from typing import Any, List, MutableMapping, Optional, Sequence

from concurrent_kv.testing.legacy import LegacyRingPool

from .crossproc import manager_dict_ops, torch_queue
from .fixtures import fill_pool, filled
from .names import Impl, Op
from .results import Results, Row, Rows, find
from .settings import HOT, SIZES, Settings, Task
from .timing import Stats, latency

NOTES = [
    "Ray runs in a forked child process: it leaves background threads that would slow every later measurement.",
]
RAY_TIMEOUT_S = 300


class _LockedClones:
    """Clones of entries in a mapping behind one ``threading.Lock``: reads clone under the lock
    (a private copy, like our ``get``); subclasses decide how writes evict."""

    def __init__(self, store: MutableMapping[int, Any]) -> None:
        self._store = store
        self._lock = threading.Lock()

    def get(self, key: int) -> Optional[Any]:
        with self._lock:
            kv = self._store.get(key)
            return None if kv is None else kv.clone()


class DictLockPool(_LockedClones):
    """The simplest thread-safe pool: a dict of clones under one lock, FIFO-bounded."""

    def __init__(self, capacity: int) -> None:
        super().__init__({})
        self.capacity = capacity

    def set(self, key: int, kv: Any) -> None:
        with self._lock:
            if key not in self._store and len(self._store) >= self.capacity:
                del self._store[next(iter(self._store))]  # oldest insertion
            self._store[key] = kv.clone()


class CachetoolsPool(_LockedClones):
    """``cachetools.LRUCache`` of clones behind a lock (cachetools is not thread-safe)."""

    def __init__(self, capacity: int) -> None:
        import cachetools

        super().__init__(cachetools.LRUCache(maxsize=capacity))

    def set(self, key: int, kv: Any) -> None:
        with self._lock:
            self._store[key] = kv.clone()


def _row(size: str, impl: str, op: str, stats: Stats) -> Row:
    return {"size": size, "bytes": SIZES[size].nbytes, "impl": impl, "op": op, **stats}


def _skipped(sizes: Sequence[str], impl: str, why: str) -> Rows:
    return [{"size": size, "impl": impl, "skipped": why} for size in sizes]


def measure_legacy(size: str, slots: int, n: int) -> Rows:
    """LegacyRingPool: ``set`` (ring write, 2 x layers ``copy_``) and ``get`` + the world model's
    copy of the slot into a staging entry (LightZero's read path)."""
    entry, staging = filled(size, HOT), SIZES[size].empty_entry()
    pool = LegacyRingPool(slots)
    fill_pool(pool, entry, slots)
    pool.set(HOT, entry)  # newest: survives the timed ring writes below for `slots` writes
    fresh = itertools.count(10**9)

    def get_copy() -> None:
        LegacyRingPool._copy_into(staging, pool.get(HOT))

    return [_row(size, Impl.LEGACY, Op.LEGACY_GET, latency(get_copy, n)),
            _row(size, Impl.LEGACY, Op.LEGACY_SET, latency(lambda: pool.set(next(fresh), entry), n))]


def measure_clone_pool(size: str, impl: str, slots: int, n: int) -> Rows:
    """A pool of clones (dict + lock, or cachetools): get, rewrite, evicting set."""
    try:
        pool = CachetoolsPool(slots) if impl == Impl.CACHETOOLS else DictLockPool(slots)
    except ImportError:
        return _skipped([size], impl, "cachetools not installed")
    entry = filled(size, HOT)
    fill_pool(pool, entry, slots)
    fresh = itertools.count(10**9)
    return [
        _row(size, impl, Op.CLONE_GET, latency(lambda: pool.get(HOT), n)),
        _row(size, impl, Op.SET, latency(lambda: pool.set(HOT, entry), n)),
        _row(size, impl, Op.SET_EVICTING, latency(lambda: pool.set(next(fresh), entry), n)),
    ]


def measure_manager_dict(size: str, n: int) -> Rows:
    ops = manager_dict_ops(SIZES[size], n)
    return [_row(size, Impl.MANAGER_DICT, Op.PLAIN_GET, ops["get"]),
            _row(size, Impl.MANAGER_DICT, Op.PLAIN_SET, ops["set"])]


def measure_torch_queue(size: str, n: int) -> Rows:
    return [_row(size, Impl.TORCH_QUEUE, Op.SEND_RECEIVE, torch_queue(SIZES[size], n))]


def _ray_rows(sizes: Sequence[str], n: int) -> Rows:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        rows = []
        for size in sizes:
            t = filled(size, HOT)._block
            rows.append(_row(size, Impl.RAY, Op.PUT_GET, latency(lambda: ray.get(ray.put(t)), n, warmup=10)))
        return rows
    finally:
        ray.shutdown()


def _ray_child(sizes: Sequence[str], n: int, results: Any) -> None:
    try:
        results.put(_ray_rows(sizes, n))
    except BaseException as exc:
        results.put(_skipped(sizes, Impl.RAY, f"ray failed: {type(exc).__name__}: {exc}"))


def measure_ray(sizes: Sequence[str], n: int) -> Rows:
    """``ray.get(ray.put(tensor))`` per size, in a forked child: Ray leaves background threads
    behind, which would take the GIL from every later measurement of this process."""
    if importlib.util.find_spec("ray") is None:
        return _skipped(sizes, Impl.RAY, "ray not installed")
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=_ray_child, args=(list(sizes), n, results))
    proc.start()
    try:
        return results.get(timeout=RAY_TIMEOUT_S)
    except queue.Empty:
        return _skipped(sizes, Impl.RAY, f"ray gave no result in {RAY_TIMEOUT_S} s")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()


def baseline_tasks(s: Settings) -> List[Task]:
    """Per size: the in-process baselines, then Manager dict and torch queue; Ray last, all sizes
    in one child process."""
    tasks = []
    for size in s.micro_sizes:
        n, xn = s.calls[size], s.xproc_calls
        per_size = [
            (Impl.LEGACY, "in_process", "legacy", partial(measure_legacy, size, s.slots, n)),
            (Impl.DICT_LOCK, "in_process", "dict+lock", partial(measure_clone_pool, size, Impl.DICT_LOCK, s.slots, n)),
            (Impl.CACHETOOLS, "in_process", "cachetools",
             partial(measure_clone_pool, size, Impl.CACHETOOLS, s.slots, n)),
            (Impl.MANAGER_DICT, "cross_process", "Manager().dict()", partial(measure_manager_dict, size, xn)),
            (Impl.TORCH_QUEUE, "cross_process", "torch queue", partial(measure_torch_queue, size, xn)),
        ]
        tasks += [Task("baselines", table, f"baseline {size} {label}", run)
                  for impl, table, label, run in per_size if impl in s.baselines]
    if Impl.RAY in s.baselines:
        tasks.append(Task("baselines", "cross_process", "baseline ray",
                          partial(measure_ray, s.micro_sizes, s.xproc_calls)))
    return tasks


def summarize_baselines(results: Results) -> None:
    """Shared pool (fifo) against the cross-process baselines, per size: x faster, by p50."""
    if "baselines" not in results:
        return
    ops = results.get("micro", {}).get("ops", [])
    xp = results["baselines"].get("cross_process", [])
    rows = []
    for size in SIZES:
        get = find(ops, size=size, policy="fifo", backend="shared", op=Op.GET_OUT)
        put = find(ops, size=size, policy="fifo", backend="shared", op=Op.SET)
        if not (get and put):
            continue
        md_get = find(xp, size=size, impl=Impl.MANAGER_DICT, op=Op.PLAIN_GET)
        md_set = find(xp, size=size, impl=Impl.MANAGER_DICT, op=Op.PLAIN_SET)
        ray = find(xp, size=size, impl=Impl.RAY, op=Op.PUT_GET)
        q = find(xp, size=size, impl=Impl.TORCH_QUEUE)
        row: Row = {"size": size, "shared_get_us": get["p50_us"], "shared_set_us": put["p50_us"]}
        if md_get and md_set:
            row["x_vs_manager_dict_get"] = md_get["p50_us"] / get["p50_us"]
            row["x_vs_manager_dict_set"] = md_set["p50_us"] / put["p50_us"]
        if ray:
            row["x_vs_ray_put_get"] = ray["p50_us"] / (get["p50_us"] + put["p50_us"])
        if q:
            row["x_vs_torch_queue"] = q["p50_us"] / get["p50_us"]
        rows.append(row)
    results["baselines"]["shared_vs_cross_process"] = rows
