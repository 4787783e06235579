"""Stress tier for threads: longer bounded runs over every policy and lock, many seeds.

Each run is bounded by time (``STRESS_SECONDS``, default 1.5 s) and by op count; every read is
verified against its key, every counter is reconciled, and the invariants are checked at the end.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from concurrent_kv import KVCachePool, PoolExhaustedError
from concurrent_kv.workload import WorkloadConfig, make_manager, run_collectors

from ..helpers import SMALL, assert_leases_released_and_refillable, is_entry_of, keyed_entry

pytestmark = pytest.mark.stress
SECONDS = float(os.environ.get("STRESS_SECONDS", "1.5"))
THREADS = 8


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("strategy", ["fifo", "lru", "priority"])
@pytest.mark.parametrize("lock", ["rw", "mutex"])
def test_mixed_ops_until_deadline(strategy: str, lock: str, seed: int) -> None:
    capacity = 12  # > THREADS, so leases alone can never exhaust the pool... except when all overlap
    pool = KVCachePool(capacity, strategy, lock=lock)
    deadline = time.monotonic() + SECONDS
    totals = {"hits": 0, "misses": 0, "sets": 0, "corrupt": 0, "exhausted": 0}
    guard = threading.Lock()
    errors = []

    def body(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        mine = dict.fromkeys(totals, 0)
        out = SMALL.empty_entry()
        entries = {k: keyed_entry(k) for k in range(40)}
        try:
            for _ in range(200_000):
                if time.monotonic() > deadline:
                    break
                key = rng.randrange(40)
                r = rng.random()
                if r < 0.4:
                    got = pool.get(key, out=out)
                    mine["hits" if got is not None else "misses"] += 1
                    if got is not None and not is_entry_of(got, key):
                        mine["corrupt"] += 1
                elif r < 0.55:
                    with pool.lease(key) as view:
                        mine["hits" if view is not None else "misses"] += 1
                        if view is not None:
                            time.sleep(0)  # widen the window in which the slot is pinned
                            if not is_entry_of(view, key):
                                mine["corrupt"] += 1
                elif r < 0.95:
                    try:
                        pool.set(key, entries[key], priority=rng.random())
                        mine["sets"] += 1
                    except PoolExhaustedError:
                        mine["exhausted"] += 1
                elif r < 0.99:
                    pool.delete(key)
                else:
                    pool.clear()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))
        with guard:
            for name, value in mine.items():
                totals[name] += value

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert totals["corrupt"] == 0
    stats = pool.stats_snapshot()
    assert (stats.hits, stats.misses) == (totals["hits"], totals["misses"])
    assert stats.inserts + stats.updates == totals["sets"]
    pool.check()
    assert_leases_released_and_refillable(pool)


@pytest.mark.parametrize("lock", ["rw", "mutex"])
def test_many_collectors_over_atari_sized_entries(lock: str) -> None:
    cfg = WorkloadConfig(env_num=8, collectors=8, num_simulations=25, steps=8, episode_length=5)
    with make_manager(cfg, lock=lock) as manager:
        result = run_collectors(manager, cfg, timeout_s=120)
        assert result.total.errors == []
        assert result.total.corrupt == 0 and result.total.verified == result.total.hits > 0
        assert manager.recur_pool.stats_snapshot().misses == 0
        manager.check()
