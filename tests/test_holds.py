"""pool.py holders and collector.py: holds keep a collector's entries from eviction and from
other collectors' clears; a clear releases only one's own; a full pool refuses, never crashes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from concurrent_kv import CollectorCaches, HolderError, KVCacheManager, KVCachePool, PoolExhaustedError
from concurrent_kv.errors import ClosedError, ConfigError, EnvIdError

from .helpers import SMALL, is_entry_of, keyed_entry


def pool(capacity: int = 4, shared: bool = False, **kw) -> KVCachePool:
    return KVCachePool(capacity, entry_spec=SMALL, shared=shared, name="holds", **kw)


@pytest.fixture(params=[False, True], ids=["local", "shared"])
def any_pool(request):
    p = pool(4, shared=request.param)
    yield p
    p.close()


def test_a_release_removes_only_the_releasing_holders_entries(any_pool: KVCachePool) -> None:
    a, b = any_pool.add_holder(), any_pool.add_holder()
    any_pool.set(1, keyed_entry(1), holder=a)
    any_pool.set(2, keyed_entry(2), holder=b)
    assert any_pool.release(a) == 1
    assert 1 not in any_pool and is_entry_of(any_pool.get(2), 2)
    any_pool.check()


def test_an_entry_two_holders_stored_is_one_copy_until_the_last_lets_go(any_pool: KVCachePool) -> None:
    a, b = any_pool.add_holder(), any_pool.add_holder()
    slot_a = any_pool.set(7, keyed_entry(7), holder=a)
    slot_b = any_pool.set(7, keyed_entry(7), holder=b)
    assert slot_a == slot_b and len(any_pool) == 1
    assert any_pool.occupancy().held == 1
    assert any_pool.release(a) == 0
    assert is_entry_of(any_pool.get(7), 7)
    assert any_pool.release(b) == 1
    assert 7 not in any_pool
    any_pool.check()


def test_eviction_never_takes_a_held_entry_and_a_full_pool_refuses_with_a_count(any_pool: KVCachePool) -> None:
    h = any_pool.add_holder()
    any_pool.set(100, keyed_entry(100))  # unheld: evictable
    for k in (1, 2, 3):
        any_pool.set(k, keyed_entry(k), holder=h)
    any_pool.set(4, keyed_entry(4), holder=h)  # evicts the unheld entry, not a held one
    assert 100 not in any_pool and all(k in any_pool for k in (1, 2, 3, 4))
    before = any_pool.stats_snapshot()
    with pytest.raises(PoolExhaustedError, match="held"):
        any_pool.set(5, keyed_entry(5))
    assert any_pool.stats_snapshot() == before  # a refused store changes nothing
    assert sorted(any_pool.keys()) == [1, 2, 3, 4] and all(is_entry_of(any_pool.get(k), k) for k in (1, 2, 3, 4))
    any_pool.check()


def test_rewriting_a_leased_held_key_moves_the_hold_to_the_new_slot(any_pool: KVCachePool) -> None:
    a, b = any_pool.add_holder(), any_pool.add_holder()
    any_pool.set(1, keyed_entry(1), holder=a)
    with any_pool.lease(1):
        any_pool.set(1, keyed_entry(1), holder=b)  # the old slot is leased: a new slot, old retired
        any_pool.check()
    assert any_pool.occupancy().held == 1
    assert any_pool.release(b) == 0  # a still holds the new value
    assert any_pool.release(a) == 1
    any_pool.check()


def test_delete_and_clear_drop_holds_with_the_entries(any_pool: KVCachePool) -> None:
    h = any_pool.add_holder()
    any_pool.set(1, keyed_entry(1), holder=h)
    any_pool.set(2, keyed_entry(2), holder=h)
    assert any_pool.delete(1)
    any_pool.clear()
    assert any_pool.occupancy().held == 0 and len(any_pool) == 0
    assert any_pool.release(h) == 0
    any_pool.check()


def test_holder_ids_are_validated_and_an_exclusive_holder_refuses_company(any_pool: KVCachePool) -> None:
    h = any_pool.add_holder(exclusive=True)
    with pytest.raises(ConfigError, match="another collector"):
        any_pool.add_holder(exclusive=True)
    for bad in (True, -1, 10_000, "0", None if False else 1.0):
        with pytest.raises(HolderError):
            any_pool.release(bad)
    free_id = (h + 1) % 4
    with pytest.raises(HolderError):
        any_pool.set(1, keyed_entry(1), holder=free_id)
    assert len(any_pool) == 0  # a refused call stored nothing
    assert any_pool.remove_holder(h) == 0
    with pytest.raises(HolderError):
        any_pool.release(h)
    with pytest.raises(ConfigError):
        any_pool.add_holder(exclusive="yes")


def test_holders_run_out_with_a_typed_error() -> None:
    with pool(2, max_workers=2, shared=True) as p:
        p.add_holder(), p.add_holder()
        with pytest.raises(ConfigError, match="holder rows"):
            p.add_holder()


def _hold_and_die(handle, ready) -> None:
    p = KVCachePool.attach(handle)
    h = p.add_holder()
    p.set(11, keyed_entry(11), holder=h)
    p.set(12, keyed_entry(12), holder=h)
    ready.set()
    time.sleep(60)


def test_a_sigkilled_holders_holds_are_released_by_crash_repair() -> None:
    with pool(3, shared=True) as owner:
        mine = owner.add_holder()
        owner.set(1, keyed_entry(1), holder=mine)
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        child = ctx.Process(target=_hold_and_die, args=(owner.handle(), ready))
        child.start()
        try:
            assert ready.wait(60)
            assert owner.occupancy().held == 3
            with pytest.raises(PoolExhaustedError):
                owner.set(2, keyed_entry(2))  # every slot held
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
        owner.recover()
        assert sorted(owner.keys()) == [1]  # the dead collector's entries went with its holds
        assert is_entry_of(owner.get(1), 1)
        owner.set(2, keyed_entry(2))
        owner.check()


# -- CollectorCaches ------------------------------------------------------------------------


def manager(env_num: int = 4, shared: bool = False) -> KVCacheManager:
    return KVCacheManager({"num_simulations": 2, "init_pool_size": 4, "recur_pool_size": 6, "wm_pool_size": 2},
                          env_num, shared=shared, entry_spec=SMALL)


def test_collectors_keep_their_own_roots_and_their_recur_trees_through_each_others_clears() -> None:
    with manager(4) as m:
        a, b = m.collector(0, 2), m.collector(2, 2)
        a.set_init_cache(0, 5, keyed_entry(5))
        b.set_init_cache(0, 5, keyed_entry(6))  # same env index, same key: another root pool
        assert is_entry_of(a.get_init_cache(0, 5), 5) and is_entry_of(b.get_init_cache(0, 5), 6)
        a.set_recur_cache(10, keyed_entry(10))
        b.set_recur_cache(20, keyed_entry(20))
        assert a.clear_recur_cache() == 1  # a's new search: its tree goes, b's stays
        assert b.get_recur_cache(10) is None and is_entry_of(b.get_recur_cache(20), 20)
        assert is_entry_of(a.get_recur_cache(20), 20) and a.foreign_hits == 1
        a.clear_init_caches()
        assert a.get_init_cache(0, 5) is None and is_entry_of(b.hierarchical_get(0, 5), 6)
        m.check()
        a.close(), b.close()
        assert m.recur_pool.occupancy().held == 0


def test_a_collectors_roots_are_its_own_alone() -> None:
    with manager(4) as m:
        first = m.collector(0, 2)
        with pytest.raises(ConfigError, match="another collector"):
            m.collector(1, 2)
        with pytest.raises(ConfigError):
            m.collector(3, 2)  # past the manager's envs
        with pytest.raises(ConfigError):
            m.collector(-1)
        with pytest.raises(EnvIdError):
            first.get_init_cache(2, 1)  # env 2 is not this collector's
        first.close()
        m.collector(1, 2).close()  # free again once closed
        with pytest.raises(ClosedError):
            first.get_recur_cache(1)


def test_a_full_recur_pool_refuses_a_store_and_the_next_lookup_misses() -> None:
    with manager(2) as m:
        c = m.collector()
        assert [c.set_recur_cache(k, keyed_entry(k)) for k in range(6)] == list(range(6))
        assert c.set_recur_cache(99, keyed_entry(99)) == -1
        assert c.rejected == 1 and c.stats()["rejected"] == 1
        assert c.get_recur_cache(99) is None
        assert all(is_entry_of(c.get_recur_cache(k), k) for k in range(6))
        c.clear_recur_cache()
        assert c.set_recur_cache(99, keyed_entry(99)) >= 0


def _collector_worker(handle, first_env, keys, barrier, results) -> None:
    m = KVCacheManager.attach(handle)
    with m.collector(first_env, 1) as c:
        for k in keys:
            c.set_recur_cache(k, keyed_entry(k))
        for turn in (0, 1, None):  # collector 0 clears, then collector 1; the owner looks in between
            barrier.wait(30)
            barrier.wait(30)  # the owner reads the pool between these two waits
            if turn == first_env:
                c.clear_recur_cache()  # must not touch the other collector's entries
        results.put((first_env, c.foreign_hits))
    m.close()


def test_collectors_in_worker_processes_clear_only_their_own_entries() -> None:
    with manager(2, shared=True) as m:
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_collector_worker, args=(m.handle(), e, keys, barrier, results))
                 for e, keys in ((0, [1, 2]), (1, [3]))]
        for p in procs:
            p.start()
        seen = []
        for _ in range(3):
            barrier.wait(60)
            seen.append(sorted(m.recur_pool.keys()))
            barrier.wait(60)
        assert seen == [[1, 2, 3], [3], []]
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0]
        assert sorted(results.get(timeout=5) for _ in procs) == [(0, 0), (1, 0)]
        assert m.recur_pool.keys() == [] and m.recur_pool.occupancy().held == 0
        m.check()


def test_collector_is_exported_and_typed() -> None:
    with manager(1) as m:
        c = m.collector()
        assert isinstance(c, CollectorCaches) and "envs [0] of 1" in repr(c)
        c.close()
        c.close()  # idempotent
