"""concurrent_kv/pool.py and manager.py under threads: thread safety, with self-verifying payloads."""

from __future__ import annotations

import random
import threading
import time

import pytest

from concurrent_kv import KVCacheManager, KVCachePool, LockTimeoutError
from concurrent_kv.locks import LOCK_KINDS
from concurrent_kv.workload import WorkloadConfig, make_manager, run_collectors

from .helpers import SMALL, assert_leases_released_and_refillable, is_entry_of, keyed_entry

THREADS = 8


def _hammer(pool: KVCachePool, seed: int, ops: int, keys: int, tally: dict, barrier: threading.Barrier) -> None:
    """Random set/get/lease/delete; every read is checked against its key."""
    rng = random.Random(seed)
    local = {"hits": 0, "misses": 0, "sets": 0, "verified": 0, "corrupt": 0, "deletes": 0}
    entries = {k: keyed_entry(k) for k in range(keys)}
    out = SMALL.empty_entry()
    barrier.wait()
    for _ in range(ops):
        key = rng.randrange(keys)
        op = rng.random()
        if op < 0.45:
            got = pool.get(key, out=out if rng.random() < 0.5 else None)
        elif op < 0.6:
            with pool.lease(key) as got:
                if got is not None:
                    local["verified" if is_entry_of(got, key) else "corrupt"] += 1
                    local["hits"] += 1
                else:
                    local["misses"] += 1
            continue
        elif op < 0.95:
            pool.set(key, entries[key], priority=float(key % 5))
            local["sets"] += 1
            continue
        else:
            local["deletes"] += pool.delete(key)
            continue
        if got is None:
            local["misses"] += 1
        else:
            local["hits"] += 1
            local["verified" if is_entry_of(got, key) else "corrupt"] += 1
    with tally["lock"]:
        for name, value in local.items():
            tally[name] += value


def run_hammer(pool: KVCachePool, ops: int = 1500, keys: int = 48, seed: int = 0) -> dict:
    tally = {"lock": threading.Lock(), "hits": 0, "misses": 0, "sets": 0, "verified": 0, "corrupt": 0, "deletes": 0}
    barrier = threading.Barrier(THREADS)
    errors = []

    def body(i: int) -> None:
        try:
            _hammer(pool, seed * 1000 + i, ops, keys, tally, barrier)
        except BaseException as exc:  # pragma: no cover - reported by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert errors == []
    return tally


@pytest.mark.parametrize("strategy", ["fifo", "lru", "priority"])
@pytest.mark.parametrize("lock", LOCK_KINDS)
def test_threads_verify_every_read_and_lose_no_increment(strategy: str, lock: str) -> None:
    pool = KVCachePool(32, strategy, lock=lock)  # fewer slots than keys: evictions race with reads
    tally = run_hammer(pool)
    assert tally["corrupt"] == 0
    assert tally["verified"] == tally["hits"] > 0
    stats = pool.stats_snapshot()
    assert stats.hits == tally["hits"]
    assert stats.misses == tally["misses"]
    assert stats.inserts + stats.updates == tally["sets"]
    assert stats.evictions > 0
    pool.check()
    # Nothing stays pinned once every lease has exited: a full refill (at a priority above
    # every earlier one) evicts everything.
    for key in range(1000, 1032):
        pool.set(key, keyed_entry(key), priority=100.0)
    assert sorted(pool.keys()) == list(range(1000, 1032))
    pool.check()


def test_threads_without_stats_still_serve_correct_data() -> None:
    pool = KVCachePool(32, "lru", enable_stats=False)
    tally = run_hammer(pool, ops=800)
    assert tally["corrupt"] == 0 and tally["verified"] == tally["hits"] > 0
    assert pool.stats_snapshot().total_queries == 0
    pool.check()


def test_readers_share_the_lock_and_writers_wait() -> None:
    """Two readers hold the pool together; a writer times out while a reader holds it."""
    pool = KVCachePool(4, lock_timeout=0.2)
    pool.set(1, keyed_entry(1))
    held = pool._lock.acquire_read(1.0)  # another reader, mid-copy
    try:
        assert is_entry_of(pool.get(1), 1)  # a second reader gets in at once
        with pytest.raises(LockTimeoutError):
            pool.set(2, keyed_entry(2))
    finally:
        held.release()
    assert 2 not in pool
    pool.set(2, keyed_entry(2))  # and the writer proceeds once readers leave
    assert is_entry_of(pool.get(2), 2)
    pool.check()


def test_mutex_option_excludes_readers_from_each_other() -> None:
    pool = KVCachePool(4, lock="mutex", lock_timeout=0.2)
    pool.set(1, keyed_entry(1))
    held = pool._lock.acquire_read(1.0)
    try:
        with pytest.raises(LockTimeoutError):
            pool.get(1)
    finally:
        held.release()
    assert is_entry_of(pool.get(1), 1)


def test_lock_timeout_leaves_the_pool_unchanged() -> None:
    pool = KVCachePool(4, lock_timeout=0.1)
    for k in range(4):
        pool.set(k, keyed_entry(k))
    before = pool.stats_snapshot()
    held = pool._lock.acquire_write(1.0)
    try:
        for call in (lambda: pool.get(0), lambda: pool.set(9, keyed_entry(9)), lambda: pool.delete(0),
                     pool.clear, pool.keys, lambda: pool.lease(0).__enter__()):
            with pytest.raises(LockTimeoutError):
                call()
    finally:
        held.release()
    assert pool.stats_snapshot() == before
    assert sorted(pool.keys()) == [0, 1, 2, 3]
    assert all(is_entry_of(pool.get(k), k) for k in range(4))
    pool.check()


def test_manager_collectors_as_threads_verify_every_read() -> None:
    cfg = WorkloadConfig(env_num=8, collectors=8, num_simulations=10, steps=6, episode_length=4,
                         num_layers=2, num_heads=2, context_length=4, head_dim=8)
    with make_manager(cfg) as manager:
        result = run_collectors(manager, cfg, timeout_s=60)
        assert result.total.errors == []
        assert result.total.corrupt == 0
        assert result.total.verified == result.total.hits
        # Every recur read targets a node written earlier in the same search: it must hit.
        recur = manager.recur_pool.stats_snapshot()
        assert recur.misses == 0 and recur.hits > 0
        manager.check()


def test_sequential_handoff_between_threads_keeps_env_isolation() -> None:
    """LightZero's safe_eval: collector then evaluator drive one cache from two OS threads."""
    manager = KVCacheManager({"num_simulations": 4}, env_num=2)

    def collector() -> None:
        for step in range(20):
            manager.set_init_cache(0, step, keyed_entry(step))

    def evaluator() -> None:
        for step in range(20):
            manager.set_init_cache(1, 10_000 + step, keyed_entry(10_000 + step))

    for fn in (collector, evaluator):
        t = threading.Thread(target=fn)
        t.start()
        t.join(10)
    for step in range(20):
        assert is_entry_of(manager.get_init_cache(0, step), step)
        assert manager.get_init_cache(1, step) is None
        assert is_entry_of(manager.get_init_cache(1, 10_000 + step), 10_000 + step)
        assert manager.get_init_cache(0, 10_000 + step) is None
    manager.check()


def test_concurrent_clears_and_writes_keep_invariants() -> None:
    """Clears racing with leases: retired slots return to the free list when leases end."""
    pool = KVCachePool(16, "lru")
    stop = time.monotonic() + 1.0
    errors = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                k = rng.randrange(40)
                pool.set(k, keyed_entry(k))
                with pool.lease(rng.randrange(40)) as view:
                    if view is not None:
                        time.sleep(0)
                if rng.random() < 0.05:
                    pool.clear()
        except BaseException as exc:  # pragma: no cover
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    pool.check()
    assert_leases_released_and_refillable(pool)
