"""Linearizability of pools under threads and processes, checked with a Wing-Gong search.

Each seed runs 2-4 threads (or 2-3 processes), 3-6 operations each, over 1-3 keys, capacity above
the key count (no eviction: the property holds per key without eviction, as in Caffeine's
Lincheck tests). Every value written is unique; a read returns which value it saw (the writer tag
stored in the entry) and is also checked untorn. A deliberately broken pool shows the checker
catches violations.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
from typing import Any, List

import pytest
import torch

from concurrent_kv import EntrySpec, KVCachePool
from concurrent_kv.workload import entry_writer, fill_entry, verify_entry

from .lincheck import Op, is_linearizable

pytestmark = pytest.mark.stress
SPEC = EntrySpec(num_layers=1, num_samples=1, num_heads=1, max_tokens=2, head_dim=4)
SEEDS = int(os.environ.get("LINCHECK_SEEDS", "300"))
PROCESS_SEEDS = int(os.environ.get("LINCHECK_PROCESS_SEEDS", "40"))


def _script(seed: int, worker: int, keys: int) -> List[tuple]:
    rng = random.Random(seed * 1000 + worker)
    ops = []
    for n in range(rng.randint(3, 6)):
        key = rng.randrange(keys)
        kind = rng.choices(["set", "get", "delete"], weights=[4, 5, 1])[0]
        ops.append((kind, key, (worker + 1) * 1000 + n if kind == "set" else None))
    return ops


def _perform(pool: KVCachePool, kind: str, key: int, arg: Any, entry: Any) -> Any:
    if kind == "set":
        pool.set(key, fill_entry(entry, key, arg))
        return None
    if kind == "get":
        got = pool.get(key)
        if got is None:
            return None
        assert verify_entry(got, key), "torn or foreign entry"
        return entry_writer(got)
    return pool.delete(key)


def _run_threads(pool: KVCachePool, seed: int) -> List[Op]:
    rng = random.Random(seed)
    threads, keys = rng.randint(2, 4), rng.randint(1, 3)
    barrier = threading.Barrier(threads)
    history: List[Op] = []
    lock = threading.Lock()
    errors: List[str] = []

    def body(w: int) -> None:
        entry = SPEC.empty_entry()
        mine = []
        try:
            barrier.wait()
            for i, (kind, key, arg) in enumerate(_script(seed, w, keys)):
                t0 = time.perf_counter_ns()
                result = _perform(pool, kind, key, arg, entry)
                t1 = time.perf_counter_ns()
                mine.append(Op(w * 100 + i, t0, t1, kind, key, arg, result))
                time.sleep(0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))
        with lock:
            history.extend(mine)

    ts = [threading.Thread(target=body, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert errors == []
    return history


def _yielding(pool: KVCachePool) -> KVCachePool:
    """Widen race windows: yield the GIL at the pool's injectable point (mid-write)."""
    pool._fault = lambda point: time.sleep(0)
    return pool


@pytest.mark.parametrize("strategy", ["fifo", "lru", "priority"])
@pytest.mark.parametrize("lock", ["rw", "mutex"])
def test_thread_histories_are_linearizable(strategy: str, lock: str) -> None:
    checked = 0
    for seed in range(SEEDS // 6 if SEEDS >= 6 else 1):
        pool = _yielding(KVCachePool(8, strategy, lock=lock, entry_spec=SPEC))
        history = _run_threads(pool, seed)
        assert is_linearizable(history), f"seed {seed}: {sorted(history, key=lambda o: o.invoke)}"
        pool.check()
        checked += 1
    assert checked > 0


class VanishingPool(KVCachePool):
    """Broken on purpose: a rewrite deletes the key, yields, then stores it, so a concurrent
    reader can see the key missing although it never was (a placeholder made visible)."""

    def set(self, cache_key, kv_cache, priority=None):  # type: ignore[override]
        self.delete(cache_key)
        time.sleep(0)
        return super().set(cache_key, kv_cache, priority)


def test_checker_flags_a_broken_pool() -> None:
    violations = 0
    for seed in range(200):
        pool = VanishingPool(8, entry_spec=SPEC)
        # Start with every key present, so a read of None is only possible mid-"set".
        for key in range(3):
            pool.set(key, fill_entry(SPEC.empty_entry(), key, 7))
        history = _run_threads(pool, seed)
        seeded = [Op(-1 - k, -3, -2, "set", k, 7, None) for k in range(3)]
        violations += not is_linearizable(seeded + history)
        if violations >= 3:
            break
    assert violations >= 3, "the checker never flagged the broken pool"


def _process_worker(handle: Any, seed: int, worker: int, keys: int, start_at: int, out: Any) -> None:
    torch.set_num_threads(1)
    pool = KVCachePool.attach(handle)
    entry = SPEC.empty_entry()
    history = []
    while time.monotonic_ns() < start_at:  # start together
        pass
    try:
        for i, (kind, key, arg) in enumerate(_script(seed, worker, keys)):
            t0 = time.monotonic_ns()  # one clock for every process
            result = _perform(pool, kind, key, arg, entry)
            t1 = time.monotonic_ns()
            history.append((worker * 100 + i, t0, t1, kind, key, arg, result))
        out.put((worker, history, None))
    except BaseException as exc:
        out.put((worker, history, repr(exc)))
    finally:
        pool.close()


def test_process_histories_are_linearizable() -> None:
    ctx = mp.get_context("fork")
    checked = 0
    for seed in range(PROCESS_SEEDS):
        rng = random.Random(seed)
        procs_n, keys = rng.randint(2, 3), rng.randint(1, 3)
        with KVCachePool(8, shared=True, entry_spec=SPEC, name="lincheck") as pool:
            out = ctx.Queue()
            start_at = time.monotonic_ns() + 50_000_000
            procs = [ctx.Process(target=_process_worker, args=(pool.handle(), seed, w, keys, start_at, out))
                     for w in range(procs_n)]
            for p in procs:
                p.start()
            results = [out.get(timeout=60) for _ in procs]
            for p in procs:
                p.join(30)
            assert all(err is None for _, _, err in results), results
            history = [Op(*fields) for _, h, _ in results for fields in h]
            assert is_linearizable(history), f"seed {seed}: {sorted(history, key=lambda o: o.invoke)}"
            pool.check()
            checked += 1
    assert checked == PROCESS_SEEDS
