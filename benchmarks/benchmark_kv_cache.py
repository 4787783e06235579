"""The benchmark of concurrent_kv: per-call latency against the physical floor, baselines
(LightZero's legacy ring pool, a dict + lock, cachetools, Manager().dict(), torch queues, Ray),
the realistic UniZero trace (threads, processes, the legacy model), memory and allocations, and
hit rates of the eviction policies against Belady's optimum.

    .venv/bin/python benchmarks/benchmark_kv_cache.py                  # everything (~3 min on 2 cores)
    .venv/bin/python benchmarks/benchmark_kv_cache.py --quick          # a smoke run (< 60 s)
    .venv/bin/python benchmarks/benchmark_kv_cache.py --only micro trace
    .venv/bin/python benchmarks/benchmark_kv_cache.py --out results/mine

Sections (``--only NAME ...``; all by default):

* ``micro``: p50/p99 latency and ops/s of get (new entry), get(out=), get miss, lease hit,
  set (rewrite), hierarchical_get (init miss + recur hit, through a KVCacheManager) and set (new
  key, evicting), per entry size (8 KiB, 96 KiB, 1.27 MiB), policy (fifo, lru, priority) and
  backend (in-process ``rw`` / ``mutex`` lock, ``shared`` memory), each against the floor: one
  ``Tensor.copy_`` of the same bytes, measured in the same run.
* ``baselines``: LegacyRingPool (set; get + copy into a staging entry, as LightZero's world
  model does), a dict + threading.Lock pool of clones, cachetools.LRUCache + lock (if installed),
  Manager().dict(), torch.multiprocessing.Queue and Ray put+get (if installed).
* ``trace``: the UniZero workload (``concurrent_kv.workload``): 8 envs x 25 / 50 simulations,
  1/2/4 collector threads, 1/2 worker processes on a shared manager, rw vs mutex; and the same
  operation sequence replayed on LightZero-sized LegacyRingPools by a driver in this file.
* ``memory``: bytes per entry and per slot, metadata per slot, allocations per operation in
  steady state (tracemalloc, and tensor storages created, counted by a TorchDispatchMode).
* ``hitrate``: recur-pool key traces recorded from the workload, replayed through FIFO, LRU and
  PRIORITY pools at several capacities, beside Belady's offline optimum.

Results go to ``--out`` (default ``results/benchmark-<timestamp>/``): ``results.json``,
``results.md``, and PNG plots when matplotlib is importable. The goals check at the end prints
measured value, target and PASS / MISS (``n/a`` where not measured); nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import tracemalloc
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SIZES, latency, manager_dict_ops, torch_queue  # noqa: E402

from concurrent_kv import EntrySpec, KVCacheManager, KVCachePool  # noqa: E402
from concurrent_kv import workload as wl  # noqa: E402
from concurrent_kv.cli import ProgressBar, format_table  # noqa: E402
from concurrent_kv.testing.legacy import LegacyRingPool  # noqa: E402
from concurrent_kv.workload import CollectorResult, WorkloadConfig, entry_key, make_manager  # noqa: E402

SECTIONS = ("micro", "baselines", "trace", "memory", "hitrate")
POLICIES = ("fifo", "lru", "priority")
BACKENDS = ("rw", "mutex", "shared")
HOT = 7  # the key every hit measurement reads
MISS_KEY = 2**63 + 12345  # never stored
LEGACY_INIT_SLOTS = 256  # LightZero: min(max_cache_size=5000, max(256, 2 * num_simulations))


# -- settings and the task list ------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or ``--quick``."""

    quick: bool
    micro_sizes: Tuple[str, ...]
    calls: Dict[str, int]  # per-call timings per measurement, by entry size
    slots: int  # pool capacity in micro / baselines (UniZero's recur pool for 8 envs x 25 sims)
    xproc_calls: int  # calls per cross-process measurement
    trace_steps: int  # env steps per env per trace run
    trace_sims: Tuple[int, ...]
    trace_threads: Tuple[int, ...]
    trace_processes: Tuple[Tuple[int, int], ...]  # (processes, threads per process)
    trace_locks: Tuple[str, ...]
    trace_repeats: int  # repeats of the runs the goals compare (median taken)
    micro_repeats: int  # rounds of micro measurements, spread over the run (lowest p50 kept)
    alloc_ops: int  # operations per allocation count
    hitrate_steps: int

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick=True, micro_sizes=("96KiB",), calls={"96KiB": 500}, slots=200, xproc_calls=40,
                       trace_steps=10, trace_sims=(25,), trace_threads=(1, 2), trace_processes=((1, 1),),
                       trace_locks=("rw", "mutex"), trace_repeats=1, micro_repeats=1, alloc_ops=1000,
                       hitrate_steps=10)
        return cls(quick=False, micro_sizes=tuple(SIZES), calls={"8KiB": 3000, "96KiB": 3000, "1.27MiB": 800},
                   slots=200, xproc_calls=200, trace_steps=50, trace_sims=(25, 50), trace_threads=(1, 2, 4),
                   trace_processes=((1, 1), (1, 2), (2, 1)), trace_locks=("rw", "mutex"), trace_repeats=5,
                   micro_repeats=3, alloc_ops=10_000, hitrate_steps=40)


@dataclass
class Task:
    """One measurement: ``run()`` returns rows for ``results[section][table]``."""

    section: str
    table: str
    label: str
    run: Callable[[], Any]


class Progress(ProgressBar):
    """The demo's progress bar, counting measurements and naming the current one."""

    label = ""

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self._start
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {self.label[:44]:<44} {elapsed:6.1f} s")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def show(self, label: str) -> None:
        self.label = label
        self._draw(time.perf_counter())


# -- micro: per-call latency of pool operations ------------------------------------------


def measure_floor(size: str, n: int) -> List[Dict[str, Any]]:
    """The physical floor: one ``copy_`` of an entry's bytes into a preallocated tensor, and one
    ``clone`` (a copy into a new allocation, the floor of a get that returns a new entry)."""
    spec = SIZES[size]
    src = wl.fill_entry(spec.empty_entry(), 1)._block
    dst = torch.empty_like(src)
    return [
        {"size": size, "bytes": spec.nbytes, "op": "copy_", **latency(lambda: dst.copy_(src), n)},
        {"size": size, "bytes": spec.nbytes, "op": "clone", **latency(lambda: src.clone(), n)},
    ]


def make_pool(spec: EntrySpec, policy: str, backend: str, slots: int) -> KVCachePool:
    if backend == "shared":
        return KVCachePool(slots, policy, shared=True, entry_spec=spec, name="bench")
    return KVCachePool(slots, policy, entry_spec=spec, lock=backend)


def make_bench_manager(spec: EntrySpec, policy: str, backend: str, slots: int) -> KVCacheManager:
    """One env: a small init pool and a recur pool of ``slots``, both with ``policy``."""
    config = {"num_simulations": 25, "init_pool_size": 16, "recur_pool_size": slots, "wm_pool_size": 1,
              "init_eviction_strategy": policy, "recur_eviction_strategy": policy,
              "lock": "rw" if backend == "shared" else backend}
    return KVCacheManager(config, 1, shared=backend == "shared", entry_spec=spec)


def fill_pool(pool: KVCachePool, entry: Any) -> None:
    for k in range(pool.capacity or 0):
        pool.set(k, entry)


def measure_pool_ops(size: str, policy: str, backend: str, slots: int, n: int) -> List[Dict[str, Any]]:
    """Every micro operation on one pool (and one manager for hierarchical_get). The evicting set
    runs last: it pushes out the key the hit measurements read."""
    spec = SIZES[size]
    entry = wl.fill_entry(spec.empty_entry(), HOT)
    buf = spec.empty_entry()
    pool = make_pool(spec, policy, backend, slots)
    manager = make_bench_manager(spec, policy, backend, slots)
    try:
        fill_pool(pool, entry)
        fill_pool(manager.recur_pool, entry)
        manager.set_init_cache(0, 10**6, entry)  # a root; the measured lookup misses it, as §8 says
        fresh = itertools.count(10**9)

        def lease() -> None:
            with pool.lease(HOT):
                pass

        ops: List[Tuple[str, Callable[[], object]]] = [
            ("get (new entry)", lambda: pool.get(HOT)),
            ("get (out=)", lambda: pool.get(HOT, out=buf)),
            ("get miss", lambda: pool.get(MISS_KEY)),
            ("lease hit", lease),
            ("set (rewrite)", lambda: pool.set(HOT, entry)),
            ("hierarchical_get (out=)", lambda: manager.hierarchical_get(0, HOT, out=buf)),
            ("set (new key, evicting)", lambda: pool.set(next(fresh), entry)),
        ]
        rows = []
        for op, fn in ops:
            stats = latency(fn, n)
            if op.startswith(("get (", "lease")):
                assert HOT in pool, "the measured key must stay resident"
            rows.append({"size": size, "bytes": spec.nbytes, "policy": policy, "backend": backend, "op": op, **stats})
        return rows
    finally:
        pool.close()
        manager.close()


def micro_tasks(s: Settings, round_no: int = 0) -> List[Task]:
    tasks = []
    tag = f" (round {round_no + 1})" if s.micro_repeats > 1 else ""
    for size in s.micro_sizes:
        n = s.calls[size]
        tasks.append(Task("micro", "floor", f"micro {size} floor{tag}", partial(measure_floor, size, n)))
        for policy in POLICIES:
            for backend in BACKENDS:
                tasks.append(Task("micro", "ops", f"micro {size} {policy} {backend}{tag}",
                                  partial(measure_pool_ops, size, policy, backend, s.slots, n)))
    return tasks


# -- baselines ----------------------------------------------------------------------------


class DictLockPool:
    """The simplest thread-safe pool: a dict of clones under one ``threading.Lock``, FIFO-bounded.
    Writes clone under the lock; reads clone under the lock (a private copy, like our ``get``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: Dict[int, Any] = {}
        self._lock = threading.Lock()

    def set(self, key: int, kv: Any) -> None:
        with self._lock:
            if key not in self._d and len(self._d) >= self.capacity:
                del self._d[next(iter(self._d))]  # oldest insertion
            self._d[key] = kv.clone()

    def get(self, key: int) -> Optional[Any]:
        with self._lock:
            kv = self._d.get(key)
            return None if kv is None else kv.clone()


class CachetoolsPool:
    """``cachetools.LRUCache`` of clones behind a ``threading.Lock`` (cachetools is not thread-safe)."""

    def __init__(self, capacity: int) -> None:
        import cachetools

        self._c = cachetools.LRUCache(maxsize=capacity)
        self._lock = threading.Lock()

    def set(self, key: int, kv: Any) -> None:
        with self._lock:
            self._c[key] = kv.clone()

    def get(self, key: int) -> Optional[Any]:
        with self._lock:
            kv = self._c.get(key)
            return None if kv is None else kv.clone()


def _row(size: str, impl: str, op: str, stats: Dict[str, Any]) -> Dict[str, Any]:
    return {"size": size, "bytes": SIZES[size].nbytes, "impl": impl, "op": op, **stats}


def measure_legacy(size: str, slots: int, n: int) -> List[Dict[str, Any]]:
    """LegacyRingPool: ``set`` (ring write, 2 x layers ``copy_``) and ``get`` + the world model's
    copy of the slot into a staging entry (LightZero's read path)."""
    spec = SIZES[size]
    entry, staging = wl.fill_entry(spec.empty_entry(), HOT), spec.empty_entry()
    pool = LegacyRingPool(slots)
    for k in range(slots):
        pool.set(k, entry)
    pool.set(HOT, entry)  # newest: survives the timed ring writes below for `slots` writes
    fresh = itertools.count(10**9)

    def get_copy() -> None:
        LegacyRingPool._copy_into(staging, pool.get(HOT))

    rows = [_row(size, "legacy ring", "get + copy to staging", latency(get_copy, n))]
    rows.append(_row(size, "legacy ring", "set (ring write)", latency(lambda: pool.set(next(fresh), entry), n)))
    return rows


def measure_clone_pool(size: str, impl: str, pool: Any, slots: int, n: int) -> List[Dict[str, Any]]:
    spec = SIZES[size]
    entry = wl.fill_entry(spec.empty_entry(), HOT)
    for k in range(slots):
        pool.set(k, entry)
    fresh = itertools.count(10**9)
    return [
        _row(size, impl, "get (clone)", latency(lambda: pool.get(HOT), n)),
        _row(size, impl, "set (rewrite)", latency(lambda: pool.set(HOT, entry), n)),
        _row(size, impl, "set (new key, evicting)", latency(lambda: pool.set(next(fresh), entry), n)),
    ]


def measure_dict_lock(size: str, slots: int, n: int) -> List[Dict[str, Any]]:
    return measure_clone_pool(size, "dict + Lock (clones)", DictLockPool(slots), slots, n)


def measure_cachetools(size: str, slots: int, n: int) -> List[Dict[str, Any]]:
    try:
        pool = CachetoolsPool(slots)
    except ImportError:
        return [{"size": size, "impl": "cachetools.LRUCache + lock", "skipped": "cachetools not installed"}]
    return measure_clone_pool(size, "cachetools.LRUCache + lock", pool, slots, n)


def measure_manager_dict(size: str, n: int) -> List[Dict[str, Any]]:
    ops = manager_dict_ops(SIZES[size], n)
    return [_row(size, "Manager().dict()", "get", ops["get"]), _row(size, "Manager().dict()", "set", ops["set"])]


def measure_torch_queue(size: str, n: int) -> List[Dict[str, Any]]:
    per_item = torch_queue(SIZES[size], n)
    return [_row(size, "torch.mp.Queue", "send+receive (per item)",
                 {"n": n, "p50_us": per_item, "p99_us": None, "mean_us": per_item, "ops_per_s": 1e6 / per_item})]


def _ray_rows(sizes: Sequence[str], n: int) -> List[Dict[str, Any]]:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        rows = []
        for size in sizes:
            t = wl.fill_entry(SIZES[size].empty_entry(), HOT)._block
            rows.append(_row(size, "ray", "put + get", latency(lambda: ray.get(ray.put(t)), n, warmup=10)))
        return rows
    finally:
        ray.shutdown()


def _ray_child(sizes: Sequence[str], n: int, results: Any) -> None:
    try:
        results.put(_ray_rows(sizes, n))
    except BaseException as exc:
        results.put([{"size": size, "impl": "ray", "skipped": f"ray failed: {type(exc).__name__}: {exc}"}
                     for size in sizes])


def measure_ray(sizes: Sequence[str], n: int) -> List[Dict[str, Any]]:
    """``ray.get(ray.put(tensor))`` per size, in a forked child: Ray leaves background threads
    behind, which would take the GIL from every later measurement of this process."""
    import importlib.util
    import multiprocessing as mp
    import queue

    if importlib.util.find_spec("ray") is None:
        return [{"size": size, "impl": "ray", "skipped": "ray not installed"} for size in sizes]
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=_ray_child, args=(list(sizes), n, results))
    proc.start()
    try:
        return results.get(timeout=300)
    except queue.Empty:
        return [{"size": size, "impl": "ray", "skipped": "ray gave no result in 300 s"} for size in sizes]
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()


def baseline_tasks(s: Settings) -> List[Task]:
    tasks = []
    for size in s.micro_sizes:
        n = s.calls[size]
        tasks += [
            Task("baselines", "in_process", f"baseline {size} legacy", partial(measure_legacy, size, s.slots, n)),
            Task("baselines", "in_process", f"baseline {size} dict+lock",
                 partial(measure_dict_lock, size, s.slots, n)),
            Task("baselines", "in_process", f"baseline {size} cachetools",
                 partial(measure_cachetools, size, s.slots, n)),
            Task("baselines", "cross_process", f"baseline {size} Manager().dict()",
                 partial(measure_manager_dict, size, s.xproc_calls)),
            Task("baselines", "cross_process", f"baseline {size} torch queue",
                 partial(measure_torch_queue, size, s.xproc_calls)),
        ]
    tasks.append(Task("baselines", "cross_process", "baseline ray", lambda: measure_ray(s.micro_sizes, s.xproc_calls)))
    return tasks


# -- trace: the UniZero workload ----------------------------------------------------------


@contextlib.contextmanager
def payload_checks(enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, the workload neither fills written entries with their key nor
    verifies reads (``fill_entry``, ``verify_entry``, ``entry_writer`` become no-ops), so a run
    times the cache alone. The legacy driver calls the same module functions, so it is patched too."""
    if enabled:
        yield
        return
    saved = wl.fill_entry, wl.verify_entry, wl.entry_writer
    wl.fill_entry = lambda entry, key, writer=0: entry
    wl.verify_entry = lambda entry, key: True
    wl.entry_writer = lambda entry: 0
    try:
        yield
    finally:
        wl.fill_entry, wl.verify_entry, wl.entry_writer = saved


def trace_config(sims: int, steps: int, collectors: int, recur_clear: str = "auto") -> WorkloadConfig:
    return WorkloadConfig(env_num=8, collectors=collectors, num_simulations=sims, steps=steps, recur_clear=recur_clear)


def trace_row(variant: str, cfg: WorkloadConfig, lock: str, threads: int, processes: int, checks: bool,
              total: CollectorResult, elapsed: float) -> Dict[str, Any]:
    calls = cfg.steps * cfg.num_simulations  # batched recurrent calls (all 8 envs each)
    return {
        "variant": variant, "sims": cfg.num_simulations, "lock": lock, "threads": threads, "processes": processes,
        "checks": "fill+verify" if checks else "cache only", "recur_clear": cfg.clear_mode(),
        "env_steps": total.steps, "ops": total.ops, "reads": total.reads, "hits": total.hits, "writes": total.writes,
        "verified": total.verified, "corrupt": total.corrupt, "errors": len(total.errors),
        "elapsed_s": elapsed, "env_steps_per_s": total.steps / elapsed, "ops_per_s": total.ops / elapsed,
        "us_per_recurrent_call": elapsed / calls * 1e6,
    }


def run_ours_threads(sims: int, steps: int, threads: int, lock: str, checks: bool) -> Dict[str, Any]:
    """``threads`` collector threads over 8 envs on one in-process manager."""
    cfg = trace_config(sims, steps, threads)
    with payload_checks(checks), make_manager(cfg, lock=lock) as manager:
        result = wl.run_collectors(manager, cfg)
        manager.check()
    return trace_row("ours", cfg, lock, threads, 0, checks, result.total, result.elapsed_s)


def run_ours_processes(sims: int, steps: int, processes: int, threads: int, lock: str, checks: bool) -> Dict[str, Any]:
    """``processes`` forked workers x ``threads`` collector threads on one shared manager. Every
    configuration deletes its own search's keys (``recur_clear="own"``), so the work is the same."""
    cfg = trace_config(sims, steps, processes * threads, recur_clear="own")
    with payload_checks(checks), make_manager(cfg, shared=True, lock=lock) as manager:
        result = wl.run_processes(manager, cfg, processes, "fork")
        manager.check()
    row = trace_row("ours (shared)", cfg, lock, threads, processes, checks, result.total, result.elapsed_s)
    row["startup_s"] = result.startup_s
    return row


def legacy_collector(cfg: WorkloadConfig) -> Tuple[CollectorResult, float]:
    """``workload.run_collector`` with one collector over all envs, replayed on LegacyRingPools
    sized as LightZero sizes them: the same random choices, keys, payload fills and read checks,
    in the same order. A hierarchical lookup probes the env's init dict, then the recur dict, and
    copies the hit into a staging entry (LightZero's read path); the recur pool is cleared per
    search (LightZero), the env's init pool at each episode end. Every ring slot is allocated before
    the clock starts (steady state; our manager's storage is also allocated before)."""
    envs = list(range(cfg.env_num))
    init = [LegacyRingPool(LEGACY_INIT_SLOTS) for _ in envs]
    recur = LegacyRingPool(cfg.num_simulations * cfg.env_num)
    copy_into = LegacyRingPool._copy_into
    res = CollectorResult()
    rng = random.Random(entry_key(cfg.seed, 0))  # run_collectors' collector 0 of writer 0
    scratch, staging = cfg.spec.empty_entry(), cfg.spec.empty_entry()
    prev_root: Dict[int, Optional[int]] = {e: None for e in envs}
    for pool in (*init, recur):  # LightZero allocates a slot on first use and never frees it: in a
        for i in range(pool.pool_size):  # long-running collector every slot exists, as ours are
            pool.set(-1 - i, scratch)  # preallocated when the manager is built (outside the timing)
        pool.clear()

    def read(env_id: int, key: int, hierarchical: bool) -> None:
        res.reads += 1
        slot = init[env_id].get(key)
        if slot is None and hierarchical:
            slot = recur.get(key)
        if slot is None:
            return
        copy_into(staging, slot)
        res.hits += 1
        if wl.verify_entry(staging, key):
            res.verified += 1
            res.foreign_hits += wl.entry_writer(staging) != 0
        else:
            res.corrupt += 1

    start = time.perf_counter()
    for step in range(cfg.steps):
        roots: Dict[int, int] = {}
        for e in envs:
            previous = prev_root[e]
            if previous is not None:
                read(e, previous, hierarchical=False)
        for e in envs:
            roots[e] = entry_key(cfg.seed, e, step, -1)
            init[e].set(roots[e], wl.fill_entry(scratch, roots[e], 0))
            res.writes += 1
        trees = {e: [roots[e]] for e in envs}
        for sim in range(cfg.num_simulations):
            parents: Dict[int, int] = {}
            for e in envs:
                nodes = trees[e]
                parents[e] = nodes[0] if rng.random() < 0.5 else rng.choice(nodes)
                read(e, parents[e], hierarchical=True)
            for e in envs:
                child = entry_key(cfg.seed, e, step, sim)
                recur.set(child, wl.fill_entry(scratch, child, 0))
                res.writes += 1
                trees[e].append(child)
        recur.clear()
        res.clears += 1
        for e in envs:
            if (step + 1) % cfg.episode_length == 0:
                init[e].clear()
                res.clears += 1
                prev_root[e] = None
            else:
                prev_root[e] = roots[e]
        res.steps += len(envs)
    return res, time.perf_counter() - start


def run_legacy(sims: int, steps: int, checks: bool) -> Dict[str, Any]:
    cfg = trace_config(sims, steps, 1)
    torch.set_num_threads(1)  # as run_collectors does
    with payload_checks(checks):
        total, elapsed = legacy_collector(cfg)
    return trace_row("legacy model", cfg, "none", 1, 0, checks, total, elapsed)


def trace_tasks(s: Settings) -> List[Task]:
    """Goal-relevant runs (25 sims, 1 and 2 threads, legacy) are repeated and interleaved, with
    and without payload checks; the rest run once, with checks (as the workload ships)."""
    tasks: List[Task] = []
    steps = s.trace_steps

    def add(label: str, fn: Callable[[], Any]) -> None:
        tasks.append(Task("trace", "runs", label, fn))

    for rep in range(s.trace_repeats):
        for checks in (False, True):
            tag = "cache only" if not checks else "fill+verify"
            add(f"trace legacy 25 sims {tag}", partial(run_legacy, 25, steps, checks))
            for threads in (1, 2):
                for lock in s.trace_locks:
                    add(f"trace ours 25 sims {threads}t {lock} {tag}",
                        partial(run_ours_threads, 25, steps, threads, lock, checks))
        for procs, threads in s.trace_processes:
            for checks in (False, True):
                tag = "cache only" if not checks else "fill+verify"
                add(f"trace shared 25 sims {procs}p x {threads}t {tag}",
                    partial(run_ours_processes, 25, steps, procs, threads, "rw", checks))
    for sims in s.trace_sims:
        for threads in s.trace_threads:
            for lock in s.trace_locks:
                if sims == 25 and threads in (1, 2):
                    continue  # measured above
                add(f"trace ours {sims} sims {threads}t {lock}",
                    partial(run_ours_threads, sims, steps, threads, lock, True))
        if sims != 25:
            add(f"trace legacy {sims} sims", partial(run_legacy, sims, steps, True))
        if sims != 25:  # 25 is measured above
            for procs, threads in s.trace_processes:
                add(f"trace shared {sims} sims {procs}p x {threads}t",
                    partial(run_ours_processes, sims, steps, procs, threads, "rw", True))
    return tasks


# -- memory -------------------------------------------------------------------------------


def measure_footprint(size: str, backend: str, slots: int) -> Dict[str, Any]:
    """Bytes per entry and slot storage; metadata bytes per slot. In-process: the Python heap
    (tracemalloc) grown by building the pool with ``entry_spec`` and filling every slot with a
    64-bit key; torch's storage allocation is not on the Python heap, so tracemalloc sees none of
    it (nor the C++ side of the per-slot view tensors). Shared: the meta segment's size / slots."""
    spec = SIZES[size]
    entry = spec.empty_entry()
    keys_source = itertools.count(2**62)
    if backend == "shared":
        pool = make_pool(spec, "fifo", "shared", slots)
        try:
            fill_pool(pool, entry)
            meta = os.path.getsize(pool.handle().meta_path)
            return {"size": size, "backend": backend, "slots": slots, "entry_bytes": spec.nbytes,
                    "storage_bytes": pool.nbytes, "metadata_bytes": meta, "metadata_per_slot": meta / slots,
                    "how": "meta segment size / slots (max_workers=64 rows included)"}
        finally:
            pool.close()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pool = make_pool(spec, "fifo", backend, slots)
        for _ in range(slots):
            pool.set(next(keys_source), entry)
        meta = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    result = {"size": size, "backend": backend, "slots": slots, "entry_bytes": spec.nbytes,
              "storage_bytes": pool.nbytes, "metadata_bytes": meta, "metadata_per_slot": meta / slots,
              "how": "tracemalloc: Python heap after construction + filling, incl. 64-bit keys"}
    pool.close()
    return result


class StorageCounter:
    """Counts aten calls and the tensor storages they create (an output whose storage is not an
    input's). A ``TorchDispatchMode`` sees every tensor op, methods and in-place ops included."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                counter.calls += 1
                inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.numel()}
                for t in _tensors(out):
                    if t.numel() and t.untyped_storage().data_ptr() not in inputs:
                        counter.storages += 1
                return out

        self.mode = Mode()
        self.calls = 0
        self.storages = 0


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def alloc_ops(size: str, backend: str, slots: int) -> Tuple[List[Tuple[str, Callable[[], object]]], Callable[[], None]]:
    """The operations whose steady-state allocations are counted, and a closer."""
    spec = SIZES[size]
    entry = wl.fill_entry(spec.empty_entry(), HOT)
    buf = spec.empty_entry()
    pool = make_pool(spec, "fifo", backend, slots)
    manager = make_bench_manager(spec, "fifo", backend, slots)
    fill_pool(pool, entry)
    fill_pool(manager.recur_pool, entry)
    fresh = itertools.count(10**9)

    def lease() -> None:
        with pool.lease(HOT) as kv:
            assert kv is not None

    ops: List[Tuple[str, Callable[[], object]]] = [
        ("get (out=)", lambda: pool.get(HOT, out=buf)),
        ("set (rewrite)", lambda: pool.set(HOT, entry)),
        ("lease hit", lease),
        ("get miss", lambda: pool.get(MISS_KEY)),
        ("hierarchical_get (out=)", lambda: manager.hierarchical_get(0, HOT, out=buf)),
        ("get (new entry) [control]", lambda: pool.get(HOT)),
        ("set (new key, evicting)", lambda: pool.set(next(fresh), entry)),  # last: evicts HOT
    ]

    def close() -> None:
        pool.close()
        manager.close()

    return ops, close


def _traced_blocks() -> int:
    snap = tracemalloc.take_snapshot()
    count = sum(stat.count for stat in snap.statistics("filename"))
    del snap
    return count


def measure_allocations(size: str, backend: str, slots: int, n: int) -> List[Dict[str, Any]]:
    """Per operation, in steady state: Python heap growth (tracemalloc blocks still allocated,
    counted after a first phase of ``n`` calls and again after a second phase of ``n`` calls; their
    difference / ``n``, so what the pool legitimately keeps, e.g. the keys it holds, cancels out),
    the peak of transient Python allocation, and -- gross, every call counted -- tensor storages
    created and aten calls per operation (dispatch mode, over ``min(n, 2000)`` calls).
    ``get (new entry)`` is the control: it must show one storage per call."""
    ops, close = alloc_ops(size, backend, slots)
    rows = []
    try:
        for op, fn in ops:
            for _ in range(min(n, 2000)):
                fn()
            tracemalloc.start()
            try:
                for _ in range(n):
                    fn()
                first = _traced_blocks()
                tracemalloc.reset_peak()
                for _ in range(n):
                    fn()
                second = _traced_blocks()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            counted = min(n, 2000)
            counter = StorageCounter()
            with counter.mode:
                for _ in range(counted):
                    fn()
            rows.append({"size": size, "backend": backend, "op": op, "ops": n,
                         "net_py_blocks_per_op": (second - first) / n, "py_blocks_after_first_phase": first,
                         "py_blocks_after_second_phase": second, "transient_peak_bytes": peak,
                         "tensor_storages_per_op": counter.storages / counted,
                         "aten_calls_per_op": counter.calls / counted})
    finally:
        close()
    return rows


def memory_tasks(s: Settings) -> List[Task]:
    tasks = []
    for size in s.micro_sizes:
        for backend in BACKENDS:
            tasks.append(Task("memory", "footprint", f"memory {size} {backend}",
                              partial(measure_footprint, size, backend, s.slots)))
    for backend in BACKENDS:
        tasks.append(Task("memory", "allocations", f"allocations 96KiB {backend}",
                          partial(measure_allocations, "96KiB", backend, s.slots, s.alloc_ops)))
    return tasks


# -- hit rates ----------------------------------------------------------------------------


class RecordingManager:
    """Forwards the workload's manager calls and logs the recur pool's reads, writes and clears.
    A write's depth is its parent's + 1 (the workload writes each env's child in the order the
    envs were read), roots have depth 0; the search number is the env step."""

    def __init__(self, manager: KVCacheManager) -> None:
        self._m = manager
        self.trace: List[Tuple[Any, ...]] = []
        self._depth: Dict[int, int] = {}
        self._parents: deque = deque()
        self._search = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def get_init_cache(self, env_id: int, key: int, out: Any = None) -> Any:
        return self._m.get_init_cache(env_id, key, out)

    def set_init_cache(self, env_id: int, key: int, kv: Any, priority: Any = None) -> int:
        self._depth[key] = 0
        return self._m.set_init_cache(env_id, key, kv, priority)

    def hierarchical_get(self, env_id: int, key: int, out: Any = None) -> Any:
        self._parents.append(key)
        got = self._m.get_init_cache(env_id, key, out)
        if got is None:
            self.trace.append(("get", key))
            got = self._m.get_recur_cache(key, out)
        return got

    def set_recur_cache(self, key: int, kv: Any, priority: Any = None) -> int:
        depth = self._depth.get(self._parents.popleft(), 0) + 1
        self._depth[key] = depth
        self.trace.append(("set", key, depth, self._search))
        return self._m.set_recur_cache(key, kv, priority)

    def clear_recur_cache(self) -> None:
        self.trace.append(("clear",))
        self._m.clear_recur_cache()

    def clear_init_caches(self, env_id: Optional[int] = None) -> None:
        self._m.clear_init_caches(env_id)

    def end_search(self) -> None:
        self._search += 1


def record_trace(sims: int, steps: int, recur_clear: str) -> List[Tuple[Any, ...]]:
    """The recur-pool trace of one collector over 8 envs (a pool large enough never to evict)."""
    cfg = WorkloadConfig(env_num=8, collectors=1, num_simulations=sims, steps=steps, recur_clear=recur_clear,
                         num_layers=1, num_heads=1, context_length=1, head_dim=1)
    tiny = KVCacheManager({"num_simulations": sims, "recur_pool_size": sims * 8 * steps + 1}, 8, entry_spec=cfg.spec)
    rec = RecordingManager(tiny)
    try:
        wl.run_collector(rec, cfg, list(range(8)), 0, on_step=lambda: rec.end_search())  # type: ignore[arg-type]
    finally:
        tiny.close()
    return rec.trace


TINY = EntrySpec(1, 1, 1, 1, 1)
PRIORITIES: Dict[str, Callable[[Tuple[Any, ...]], float]] = {
    "priority (-depth)": lambda op: -float(op[2]),
    "priority (search, -depth)": lambda op: op[3] * 1000.0 - op[2],
}


def replay(trace: Sequence[Tuple[Any, ...]], capacity: int, policy: str) -> float:
    """Hit rate of the trace's reads on a real pool of ``capacity`` slots (tiny entries)."""
    strategy = "priority" if policy.startswith("priority") else policy
    prio = PRIORITIES.get(policy)
    pool = KVCachePool(capacity, strategy, enable_stats=False, entry_spec=TINY)
    entry, buf = TINY.empty_entry(), TINY.empty_entry()
    hits = gets = 0
    try:
        for op in trace:
            if op[0] == "get":
                gets += 1
                hits += pool.get(op[1], out=buf) is not None
            elif op[0] == "set":
                pool.set(op[1], entry, None if prio is None else prio(op))
            else:
                pool.clear()
    finally:
        pool.close()
    return hits / gets if gets else 0.0


def belady_hit_rate(trace: Sequence[Tuple[Any, ...]], capacity: int) -> float:
    """Belady's MIN, offline: every write must be stored; when full, evict the entry whose next
    useful read is furthest away (a read after the key's next write or after a clear is not a use
    of this copy); a read that misses inserts nothing, as in the pools."""
    n = len(trace)
    never = n + 1
    next_use = [never] * n
    upcoming: Dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        op = trace[i]
        if op[0] == "clear":
            upcoming.clear()
            continue
        next_use[i] = upcoming.get(op[1], never)
        if op[0] == "get":
            upcoming[op[1]] = i
        else:
            upcoming.pop(op[1], None)
    cache: Dict[int, int] = {}
    heap: List[Tuple[int, int]] = []  # (-next use, key), stale items skipped
    hits = gets = 0
    for i, op in enumerate(trace):
        if op[0] == "clear":
            cache.clear()
            heap.clear()
            continue
        key = op[1]
        if op[0] == "get":
            gets += 1
            if key not in cache:
                continue
            hits += 1
        elif key not in cache and len(cache) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                if cache.get(victim) == -neg:
                    del cache[victim]
                    break
        cache[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return hits / gets if gets else 0.0


def measure_hitrates(sims: int, steps: int, recur_clear: str) -> List[Dict[str, Any]]:
    trace = record_trace(sims, steps, recur_clear)
    gets = sum(op[0] == "get" for op in trace)
    base = sims * 8
    rows = []
    for frac in (0.25, 0.5, 1.0, 1.5):
        capacity = max(1, int(base * frac))
        row: Dict[str, Any] = {"sims": sims, "recur_clear": recur_clear, "steps": steps, "trace_ops": len(trace),
                               "reads": gets, "capacity_frac": frac, "capacity": capacity}
        for policy in ("fifo", "lru", *PRIORITIES):
            row[policy] = replay(trace, capacity, policy)
        row["belady"] = belady_hit_rate(trace, capacity)
        rows.append(row)
    return rows


def hitrate_tasks(s: Settings) -> List[Task]:
    return [Task("hitrate", "rows", f"hitrate 25 sims recur_clear={mode}",
                 partial(measure_hitrates, 25, s.hitrate_steps, mode)) for mode in ("global", "none")]


# -- summaries and goals ------------------------------------------------------------------

NOTES = [
    "Latency: perf_counter_ns around each call, p50/p99 of n calls after 50 warm-up calls, garbage collector "
    "off while timing, 1 torch intra-op thread; the timer's own overhead (meta.timer_overhead_us) is not subtracted.",
    "Micro: in the full run every measurement (the floor too) is taken in three rounds, at the start, the middle "
    "and the end of the run; the lowest p50 is kept (min of repeats, as timeit advises), all in p50_runs_us.",
    "x floor = p50 / p50 of one copy_ of the same bytes into a preallocated tensor, measured in the same run; "
    "a get that returns a new entry is better compared with the clone row of the floor table.",
    "Trace, fairness: 'cache only' runs turn the workload's fill_entry / verify_entry / entry_writer into no-ops "
    "for ours and for the legacy driver alike; 'fill+verify' runs keep them in both (the legacy driver verifies "
    "its staging copy as the workload verifies its out= buffer). The goals are checked on both variants.",
    "Trace, same work: the legacy driver replays run_collector's random choices and keys (same seed), checked "
    "by equal reads / hits / writes; its rings are sized as LightZero's (init 256 per env, recur sims x 8) and "
    "fully allocated before the clock starts, as our manager's storage is.",
    "Trace, threads: one collector clears the recur pool per search (as LightZero); several collectors share "
    "it, so each deletes its own search's keys instead (recur_clear=own), which is more operations.",
    "Trace, processes: forked workers attach a shared manager, then start collecting together (a barrier): elapsed "
    "runs from that start to the last worker done, as a threaded run's does; fork and attach are in startup_s; every process "
    "configuration uses recur_clear=own; no keys are common to processes (shared_keys=0).",
    "Hit rates: recur-pool reads of one collector (8 envs, 25 sims), replayed on real pools with tiny entries. "
    "priority (-depth): deepest node evicted first; priority (search, -depth): older searches first, then "
    "deepest. Belady: offline MIN, every write stored, a read miss inserts nothing.",
    "Allocations: tensor storages are counted gross (every aten output whose storage is not an input's, via "
    "TorchDispatchMode); Python heap growth is tracemalloc's block count after a second phase minus after a "
    "first phase of n calls, divided by n. Transient Python objects (tuples, lock holders) are not counted.",
    "Ray runs in a forked child process: it leaves background threads that would slow every later measurement.",
]


def _find(rows: Sequence[Dict[str, Any]], **match: Any) -> Optional[Dict[str, Any]]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _lowest_p50(rows: List[Dict[str, Any]], keys: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per measurement: the round with the lowest p50, with every round's p50 listed."""
    best: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    runs: Dict[Tuple[Any, ...], List[float]] = {}
    for r in rows:
        k = tuple(r[key] for key in keys)
        runs.setdefault(k, []).append(r["p50_us"])
        if k not in best or r["p50_us"] < best[k]["p50_us"]:
            best[k] = r
    return [{**r, "p50_runs_us": runs[k]} for k, r in best.items()]


def summarize_micro(micro: Dict[str, Any]) -> None:
    """Lowest p50 over the rounds, then ratios to the ``copy_`` floor of the same size (x floor,
    us above floor)."""
    if not micro:
        return
    micro["floor"] = _lowest_p50(micro.get("floor", []), ("size", "op"))
    micro["ops"] = _lowest_p50(micro.get("ops", []), ("size", "policy", "backend", "op"))
    floors = {r["size"]: r["p50_us"] for r in micro.get("floor", []) if r["op"] == "copy_"}
    for r in micro.get("ops", []):
        f = floors.get(r["size"])
        if f:
            r["floor_us"] = f
            r["x_floor"] = r["p50_us"] / f
            r["over_floor_us"] = r["p50_us"] - f


def summarize_trace(trace: Dict[str, Any]) -> None:
    """Median over repeats per configuration, then the legacy comparisons."""
    groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for r in trace.get("runs", []):
        groups.setdefault((r["variant"], r["sims"], r["lock"], r["threads"], r["processes"], r["checks"]), []).append(r)
    table = []
    for group in groups.values():
        mid = sorted(group, key=lambda r: r["elapsed_s"])[len(group) // 2]
        table.append({**mid, "repeats": len(group), "elapsed_runs_s": [r["elapsed_s"] for r in group]})
    table.sort(key=lambda r: (r["checks"], r["sims"], r["variant"], r["processes"], r["threads"], r["lock"]))
    trace["table"] = table
    ratios: List[Dict[str, Any]] = []

    def runs(**match: Any) -> List[Dict[str, Any]]:
        return [r for r in trace.get("runs", []) if all(r[k] == v for k, v in match.items())]

    def add(sims: int, checks: str, lock: str, comparison: str, num: List[Dict[str, Any]],
            den: List[Dict[str, Any]], **extra: Any) -> None:
        """Runs are interleaved: pair the i-th of each, take the median ratio and its range."""
        pairs = [a["elapsed_s"] / b["elapsed_s"] for a, b in zip(num, den)]  # time ratio
        if not pairs:
            return
        if "throughput" in comparison:
            pairs = [1 / x for x in pairs]  # both run the same env steps
        ratios.append({"sims": sims, "checks": checks, "lock": lock, "comparison": comparison,
                       "value": statistics.median(pairs), "min": min(pairs), "max": max(pairs),
                       "pairs": len(pairs), **extra})

    for checks in ("cache only", "fill+verify"):
        for sims in sorted({r["sims"] for r in table}):
            legacy = runs(variant="legacy model", sims=sims, checks=checks)
            for lock in ("rw", "mutex"):
                one = runs(variant="ours", sims=sims, threads=1, lock=lock, checks=checks)
                same = bool(one and legacy) and all(
                    (a["reads"], a["hits"], a["writes"]) == (b["reads"], b["hits"], b["writes"])
                    for a, b in zip(one, legacy))
                add(sims, checks, lock, "ours 1 thread time / legacy 1 thread time", one, legacy,
                    same_op_sequence=same)
                add(sims, checks, lock, "ours 2 threads throughput / legacy 1 thread throughput",
                    runs(variant="ours", sims=sims, threads=2, lock=lock, checks=checks), legacy)
        for sims in sorted({r["sims"] for r in table}):
            add(sims, checks, "rw", "2 processes x 1 thread / 1 process x 1 thread throughput",
                runs(variant="ours (shared)", sims=sims, processes=2, threads=1, checks=checks),
                runs(variant="ours (shared)", sims=sims, processes=1, threads=1, checks=checks))
    trace["ratios"] = ratios


def summarize_baselines(results: Dict[str, Any]) -> None:
    """Shared pool (fifo) against the cross-process baselines, per size."""
    if "baselines" not in results:
        return
    ops = results.get("micro", {}).get("ops", [])
    xp = results.get("baselines", {}).get("cross_process", [])
    rows = []
    for size in SIZES:
        get = _find(ops, size=size, policy="fifo", backend="shared", op="get (out=)")
        put = _find(ops, size=size, policy="fifo", backend="shared", op="set (rewrite)")
        if not (get and put):
            continue
        md_get = _find(xp, size=size, impl="Manager().dict()", op="get")
        md_set = _find(xp, size=size, impl="Manager().dict()", op="set")
        ray = _find(xp, size=size, impl="ray", op="put + get")
        q = _find(xp, size=size, impl="torch.mp.Queue")
        row: Dict[str, Any] = {"size": size, "shared_get_us": get["p50_us"], "shared_set_us": put["p50_us"]}
        if md_get and md_set:
            row["x_vs_manager_dict_get"] = md_get["p50_us"] / get["p50_us"]
            row["x_vs_manager_dict_set"] = md_set["p50_us"] / put["p50_us"]
        if ray:
            row["x_vs_ray_put_get"] = ray["p50_us"] / (get["p50_us"] + put["p50_us"])
        if q:
            row["x_vs_torch_queue"] = q["p50_us"] / get["p50_us"]
        rows.append(row)
    results["baselines"]["shared_vs_cross_process"] = rows


def goal(name: str, measured: Optional[float], target: str, limit: float, at_most: bool, unit: str = "",
         note: str = "") -> Dict[str, Any]:
    """One goal row: PASS when ``measured`` is <= ``limit`` (``at_most``) or >= it; n/a when not measured."""
    if measured is None:
        status = "n/a"
    else:
        status = "PASS" if (measured <= limit if at_most else measured >= limit) else "MISS"
    return {"goal": name, "measured": measured, "unit": unit, "target": target, "status": status, "note": note}


def _value(row: Optional[Dict[str, Any]], key: str) -> Optional[float]:
    return None if row is None else row.get(key)


def latency_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    micro = results.get("micro", {})
    ops = micro.get("ops", [])
    floor = _value(_find(micro.get("floor", []), size="96KiB", op="copy_"), "p50_us")
    out = []
    for backend in ("rw", "mutex"):
        for op in ("get (out=)", "set (rewrite)"):
            p50 = _value(_find(ops, size="96KiB", policy="fifo", backend=backend, op=op), "p50_us")
            limit = 1.3 * floor + 3 if floor else 0.0
            target = f"<= 1.3 x copy_ ({floor:.2f}) + 3 = {limit:.2f} us" if floor else "<= 1.3 x copy_ + 3 us"
            out.append(goal(f"96 KiB {op}, in-process {backend}, fifo: p50", p50 if floor else None, target, limit,
                            True, "us"))
    return out


def trace_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    ratios = results.get("trace", {}).get("ratios", [])
    out = []

    def ratio(checks: str, lock: str, comparison: str) -> Optional[float]:
        return _value(_find(ratios, sims=25, checks=checks, lock=lock, comparison=comparison), "value")

    def mutex_note(checks: str, comparison: str) -> str:
        m = ratio(checks, "mutex", comparison)
        return "" if m is None else f"lock=mutex: {m:.3f}"

    one, two = "ours 1 thread time / legacy 1 thread time", "ours 2 threads throughput / legacy 1 thread throughput"
    for checks in ("cache only", "fill+verify"):
        out.append(goal(f"trace 25 sims, 1 thread, rw ({checks}): time / legacy time", ratio(checks, "rw", one),
                        "<= 1.15", 1.15, True, "x", mutex_note(checks, one)))
        out.append(goal(f"trace 25 sims, 2 threads, rw ({checks}): throughput / legacy 1 thread",
                        ratio(checks, "rw", two), ">= 1.5", 1.5, False, "x", mutex_note(checks, two)))
    return out


def shared_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    ops = results.get("micro", {}).get("ops", [])
    miss = _value(_find(ops, size="96KiB", policy="fifo", backend="shared", op="get miss"), "p50_us")
    out = [goal("shared pool get miss (metadata path), 96 KiB: p50", miss, "<= 10 us", 10, True, "us")]
    sx = _find(results.get("baselines", {}).get("shared_vs_cross_process", []), size="96KiB") or {}
    md = min(sx["x_vs_manager_dict_get"], sx["x_vs_manager_dict_set"]) if "x_vs_manager_dict_get" in sx else None
    out.append(goal("shared pool vs Manager().dict(), 96 KiB (min of get, set)", md, ">= 10x faster", 10, False, "x"))
    ray = sx.get("x_vs_ray_put_get")
    ray_row = _find(results.get("baselines", {}).get("cross_process", []), size="96KiB", impl="ray")
    ray_note = "" if ray is not None else (ray_row or {}).get("skipped") or "not measured"
    out.append(goal("shared pool get+set vs Ray put+get, 96 KiB", ray, ">= 10x faster", 10, False, "x", ray_note))
    ratios = results.get("trace", {}).get("ratios", [])
    for checks in ("cache only", "fill+verify"):
        r = _value(_find(ratios, sims=25, checks=checks,
                         comparison="2 processes x 1 thread / 1 process x 1 thread throughput"), "value")
        out.append(goal(f"trace 25 sims, 2 processes / 1 process ({checks})", r, ">= 1.7", 1.7, False, "x",
                        "" if r is not None else "not measured (--quick runs 1 process)"))
    return out


def lease_and_allocation_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    ops = results.get("micro", {}).get("ops", [])
    out = []
    for backend in BACKENDS:
        p50 = _value(_find(ops, size="96KiB", policy="fifo", backend=backend, op="lease hit"), "p50_us")
        out.append(goal(f"lease hit, 96 KiB, {backend}: p50", p50, "<= 3 us", 3, True, "us"))
    allocs = results.get("memory", {}).get("allocations", [])
    for backend in BACKENDS:
        picked = [a for a in allocs if a["backend"] == backend and a["op"] in ("get (out=)", "set (rewrite)", "lease hit")]
        storages = max((a["tensor_storages_per_op"] for a in picked), default=None)
        blocks = max((a["net_py_blocks_per_op"] for a in picked), default=None)
        out.append(goal(f"get(out=)/set/lease, {backend}: tensor storages created per op (gross)", storages, "0", 0,
                        True, "/op"))
        out.append(goal(f"get(out=)/set/lease, {backend}: Python heap growth per op (net blocks)", blocks,
                        "0 (< 0.01: free-list noise)", 0.0099, True, "/op",
                        "transient Python objects per call not counted"))
    return out


def goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The goals check: measured value, target, PASS / MISS / n/a. Never asserted."""
    return latency_goals(results) + trace_goals(results) + shared_goals(results) + lease_and_allocation_goals(results)


# -- output -------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if abs(x) >= 10000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        return f"{x:.{digits}f}"
    return str(x)


Column = Tuple[Any, ...]  # (key, header) or (key, header, decimals)


def rows_for(rows: Sequence[Dict[str, Any]], cols: Sequence[Column]) -> List[List[str]]:
    return [[fmt(r.get(c[0]), *c[2:]) for c in cols] for r in rows]


def tables(results: Dict[str, Any]) -> List[Tuple[str, str, Sequence[Dict[str, Any]], Sequence[Column]]]:
    """(title, note, rows, columns) of every table, for the console and results.md."""
    lat: List[Column] = [("p50_us", "p50 us"), ("p99_us", "p99 us"), ("ops_per_s", "ops/s")]
    out: List[Tuple[str, str, Sequence[Dict[str, Any]], Sequence[Column]]] = []
    micro = results.get("micro", {})
    if micro:
        out.append(("micro: floor", "one copy_ into a preallocated tensor; clone = a copy into a new one",
                    micro.get("floor", []), [("size", "size"), ("op", "op"), *lat]))
        out.append(("micro: pool operations", "x floor and us above floor against copy_ of the same bytes",
                    micro.get("ops", []), [("size", "size"), ("policy", "policy"), ("backend", "backend"), ("op", "op"),
                                           *lat, ("x_floor", "x floor"), ("over_floor_us", "+us over floor")]))
    base = results.get("baselines", {})
    if base:
        out.append(("baselines: in-process", "legacy get includes the world model's copy into staging",
                    base.get("in_process", []), [("size", "size"), ("impl", "impl"), ("op", "op"), *lat, ("skipped", "skipped")]))
        out.append(("baselines: across processes", "", base.get("cross_process", []),
                    [("size", "size"), ("impl", "impl"), ("op", "op"), *lat, ("skipped", "skipped")]))
        out.append(("baselines: shared pool vs cross-process (x faster, p50)", "",
                    base.get("shared_vs_cross_process", []),
                    [("size", "size"), ("shared_get_us", "shared get(out=) us"), ("shared_set_us", "shared set us"),
                     ("x_vs_manager_dict_get", "x Manager dict get"), ("x_vs_manager_dict_set", "x Manager dict set"),
                     ("x_vs_torch_queue", "x torch queue"), ("x_vs_ray_put_get", "x Ray put+get")]))
    trace = results.get("trace", {})
    if trace:
        out.append(("trace: UniZero workload, 8 envs",
                    "median of repeats; 'cache only' = no payload fill/verify in either; a recurrent call = 8 reads "
                    "+ 8 writes of one simulation, time = elapsed / (steps x sims)",
                    trace.get("table", []),
                    [("checks", "checks"), ("sims", "sims"), ("variant", "variant"), ("processes", "procs"),
                     ("threads", "threads"), ("lock", "lock"), ("recur_clear", "recur clear"), ("repeats", "reps"),
                     ("env_steps_per_s", "env steps/s"), ("ops_per_s", "cache ops/s"),
                     ("us_per_recurrent_call", "us/recurrent call"), ("verified", "verified"), ("hits", "hits")]))
        out.append(("trace: ratios", "median and range of the ratios of runs made side by side (interleaved)",
                    trace.get("ratios", []),
                    [("checks", "checks"), ("sims", "sims"), ("lock", "lock"), ("comparison", "comparison"),
                     ("value", "median", 3), ("min", "min", 3), ("max", "max", 3), ("pairs", "pairs"),
                     ("same_op_sequence", "same op sequence")]))
    mem = results.get("memory", {})
    if mem:
        out.append(("memory: footprint", "", mem.get("footprint", []),
                    [("size", "size"), ("backend", "backend"), ("slots", "slots"), ("entry_bytes", "entry B"),
                     ("storage_bytes", "storage B"), ("metadata_per_slot", "metadata B/slot"), ("how", "how")]))
        out.append(("memory: allocations per operation, steady state", "", mem.get("allocations", []),
                    [("backend", "backend"), ("op", "op"), ("tensor_storages_per_op", "tensor storages/op"),
                     ("net_py_blocks_per_op", "net Python blocks/op", 4), ("transient_peak_bytes", "transient peak B"),
                     ("aten_calls_per_op", "aten calls/op")]))
    hit = results.get("hitrate", {})
    if hit:
        out.append(("hitrate: recur pool reads", "priority (-depth): deepest evicted first; priority (search, "
                    "-depth): older searches first, then deepest; belady: offline optimum",
                    hit.get("rows", []),
                    [("recur_clear", "recur clear"), ("reads", "reads"), ("capacity_frac", "capacity x sims*envs"),
                     ("capacity", "slots"), ("fifo", "fifo"), ("lru", "lru"), ("priority (-depth)", "prio -depth"),
                     ("priority (search, -depth)", "prio search,-depth"), ("belady", "belady")]))
    out.append(("goals", "measured on this machine in this run; nothing asserted", results.get("goals", []),
                [("goal", "goal"), ("measured", "measured", 3), ("unit", "unit"), ("target", "target"),
                 ("status", "status"), ("note", "note")]))
    return out


def md_table(rows: Sequence[Dict[str, Any]], cols: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows_for(rows, cols)]
    return "\n".join(lines)


def write_markdown(results: Dict[str, Any], path: Path) -> None:
    meta = results["meta"]
    parts = [f"# concurrent_kv benchmark ({'quick' if meta['quick'] else 'full'})", "",
             f"{meta['started']}; torch {meta['torch']}, Python {meta['python']}, {meta['cpus']} CPUs, "
             f"{meta['machine']}; runtime {meta.get('runtime_s', 0):.0f} s; timer overhead "
             f"{meta['timer_overhead_us']:.3f} us per timed call (not subtracted)", "", "## Notes", ""]
    parts += [f"* {note}" for note in results.get("notes", [])] + [""]
    for title, note, rows, cols in tables(results):
        parts += [f"## {title}", ""] + ([note, ""] if note else []) + [md_table(rows, cols), ""]
    path.write_text("\n".join(parts))


def print_tables(results: Dict[str, Any]) -> None:
    for title, note, rows, cols in tables(results):
        if title == "goals":
            continue
        print(f"\n== {title} ==" + (f"  ({note})" if note else ""))
        print(format_table(rows_for(rows, cols), [c[1] for c in cols]))


def print_notes(results: Dict[str, Any]) -> None:
    print("\n== notes ==")
    for note in results.get("notes", []):
        print(f"* {note}")


def print_goals(results: Dict[str, Any]) -> None:
    print("\n== goals (measured on this machine, this run; never asserted) ==")
    rows = [[g["goal"], fmt(g["measured"], 3) + (f" {g['unit']}" if g["measured"] is not None else ""), g["target"],
             g["status"] + (f" ({g['note']})" if g["note"] else "")] for g in results["goals"]]
    widths = [max(len(r[i]) for r in rows + [["goal", "measured", "target", "status"]]) for i in range(4)]
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    print(fmt_row(["goal", "measured", "target", "status"]))
    print("  ".join("-" * w for w in widths[:3]) + "  " + "-" * 6)
    for r in rows:
        print(fmt_row(r))


def write_plots(results: Dict[str, Any], out: Path) -> List[str]:
    """PNG plots, if matplotlib is importable; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib not installed")
        return []
    written = []
    ops = results.get("micro", {}).get("ops", [])
    for size in sorted({r["size"] for r in ops}, key=list(SIZES).index):
        rows = [r for r in ops if r["size"] == size and r["policy"] == "fifo"]
        names = list(dict.fromkeys(r["op"] for r in rows))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(BACKENDS)
        for i, backend in enumerate(BACKENDS):
            vals = [(_find(rows, backend=backend, op=o) or {}).get("p50_us", 0) for o in names]
            ax.bar([x + i * width for x in range(len(names))], vals, width, label=backend)
        floor = _find(results["micro"].get("floor", []), size=size, op="copy_")
        if floor:
            ax.axhline(floor["p50_us"], color="k", linestyle="--", label="copy_ floor")
        ax.set_xticks([x + width for x in range(len(names))], names, rotation=20, ha="right")
        ax.set_ylabel("p50 us")
        ax.set_title(f"pool operations, {size}, fifo")
        ax.legend()
        fig.tight_layout()
        path = out / f"micro_{size}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    table = results.get("trace", {}).get("table", [])
    if table:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for checks in ("cache only", "fill+verify"):
            for lock in ("rw", "mutex"):
                pts = sorted((r["threads"], r["env_steps_per_s"]) for r in table
                             if r["variant"] == "ours" and r["sims"] == 25 and r["lock"] == lock and r["checks"] == checks)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"ours {lock} ({checks})")
            legacy = _find(table, variant="legacy model", sims=25, checks=checks)
            if legacy:
                ax.axhline(legacy["env_steps_per_s"], color="gray" if checks == "cache only" else "black",
                           linestyle="--" if checks == "cache only" else ":", label=f"legacy 1 thread ({checks})")
        ax.set_xticks(sorted({r["threads"] for r in table if r["variant"] == "ours"}))
        ax.set_xlabel("collector threads")
        ax.set_ylabel("env steps / s")
        ax.set_title("UniZero trace, 8 envs, 25 sims")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "trace.png", dpi=100)
        plt.close(fig)
        written.append("trace.png")
    hit = results.get("hitrate", {}).get("rows", [])
    if hit:
        modes = sorted({r["recur_clear"] for r in hit})
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            rows = [r for r in hit if r["recur_clear"] == mode]
            for policy in ("fifo", "lru", *PRIORITIES, "belady"):
                ax.plot([r["capacity_frac"] for r in rows], [r[policy] for r in rows], marker="o", label=policy)
            ax.set_xlabel("capacity / (sims x envs)")
            ax.set_ylabel("recur read hit rate")
            ax.set_title(f"recur_clear={mode}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "hitrate.png", dpi=100)
        plt.close(fig)
        written.append("hitrate.png")
    return written


# -- main ---------------------------------------------------------------------------------


def build_tasks(s: Settings, only: Sequence[str]) -> List[Task]:
    """Every section's tasks in order; further micro rounds are spread over the rest of the run
    (the last one at its end), so that a transient slowdown of the machine cannot spoil every
    round of one measurement."""
    makers = {"micro": micro_tasks, "baselines": baseline_tasks, "trace": trace_tasks,
              "memory": memory_tasks, "hitrate": hitrate_tasks}
    tasks = [t for name in SECTIONS if name in only for t in makers[name](s)]
    if "micro" not in only or s.micro_repeats < 2:
        return tasks
    first = [t for t in tasks if t.section == "micro"]
    rest = [t for t in tasks if t.section != "micro"]
    out, rounds = list(first), s.micro_repeats - 1
    for round_no in range(1, s.micro_repeats):
        share = rest[(round_no - 1) * len(rest) // rounds: round_no * len(rest) // rounds]
        out += share + micro_tasks(s, round_no)
    return out


def run_tasks(tasks: Sequence[Task], results: Dict[str, Any], show_progress: bool) -> None:
    bar = Progress(len(tasks)) if show_progress else None
    seconds = results["meta"].setdefault("section_s", {})
    for task in tasks:
        if bar is not None:
            bar.show(task.label)
        start = time.perf_counter()
        rows = task.run()
        seconds[task.section] = seconds.get(task.section, 0.0) + time.perf_counter() - start
        table = results.setdefault(task.section, {}).setdefault(task.table, [])
        table.extend(rows if isinstance(rows, list) else [rows])
        if bar is not None:
            bar.advance()


def timer_overhead_us() -> float:
    return latency(lambda: None, 20000)["p50_us"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer calls, 96 KiB only, short traces")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="NAME",
                        help=f"sections to run: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/benchmark-<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out if args.out is not None else Path("results") / f"benchmark-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.make(args.quick)
    torch.set_num_threads(1)  # the workload does the same; copies are small, threads are the parallelism
    start = time.perf_counter()
    results: Dict[str, Any] = {"meta": {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "sections": list(args.only),
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "machine": platform.platform(), "torch_threads": 1, "timer_overhead_us": timer_overhead_us(),
        "settings": {k: v for k, v in settings.__dict__.items()},
    }}
    print(f"concurrent_kv benchmark ({'quick' if args.quick else 'full'}): {', '.join(args.only)}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 intra-op thread; results -> {out}")
    run_tasks(build_tasks(settings, args.only), results, not args.no_progress)
    summarize_micro(results.get("micro", {}))
    summarize_trace(results.get("trace", {}))
    summarize_baselines(results)
    results["goals"] = goals(results)
    results["notes"] = NOTES
    results["meta"]["runtime_s"] = time.perf_counter() - start
    print_tables(results)
    results["meta"]["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_markdown(results, out / "results.md")
    print_notes(results)
    print_goals(results)
    print(f"\nruntime {results['meta']['runtime_s']:.1f} s; wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f", {len(results['meta']['plots'])} plots" if results["meta"]["plots"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
