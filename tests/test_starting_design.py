"""The 35 behaviours listed by the starting design (docs: shared/reference/starting-design.md),
plus the lease contract of :class:`KVCachePool`.

Entries are built so that their data encode a value (``fill`` below), and every read is compared
exactly (``torch.equal``) with what was written, so a cache that hands back another key's data,
a shared reference or a half-written slot fails loudly. Every test that mutates a pool ends with
``check()``, the pool's own invariant audit.
"""

from __future__ import annotations

import dataclasses
import random
import types
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch
import xxhash

from concurrent_kv import (
    CacheStats,
    EvictionStrategy,
    KeysValues,
    KVCacheManager,
    KVCachePool,
    ManagerConfig,
    PoolExhaustedError,
    StatsSnapshot,
    hash_state,
)

from .helpers import (
    EMBED,
    EMBED_DIM,
    ENTRY_KINDS,
    HEADS,
    LAYERS,
    LZKeysValues,
    MAX_TOKENS,
    NUM_HEADS,
    NUM_LAYERS,
    TOKENS,
    _latent,
    assert_entry,
    assert_same_data,
    caches,
    data_of,
    entry,
    fill,
    pool_of,
    real_entry,
)


# --------------------------------------------------------------------------------------------
# KVCachePool (9 + leases)
# --------------------------------------------------------------------------------------------


def test_pool_basic_set_get_returns_private_copy() -> None:
    """set/get round-trips data and _size exactly; get returns a private copy each time."""
    pool = pool_of(4)
    slot = pool.set(7, entry(7, size=2))
    assert isinstance(slot, int) and 0 <= slot < pool.capacity
    got = pool.get(7)
    assert_entry(got, 7, size=2)
    assert got.size == 2
    # Mutating the returned copy (data and size) must not reach the pool.
    for c in caches(got):
        c._cache.fill_(-1.0)
        c._size = 0
    assert_entry(pool.get(7), 7, size=2)
    # Two gets are two distinct objects with distinct storage.
    a, b = pool.get(7), pool.get(7)
    assert a is not b
    assert caches(a)[0]._cache.data_ptr() != caches(b)[0]._cache.data_ptr()
    assert pool.get(8) is None
    pool.check()


def test_pool_fifo_eviction_order() -> None:
    """FIFO evicts in insertion order; reads do not change it."""
    pool = pool_of(3, EvictionStrategy.FIFO)
    for k in (1, 2, 3):
        pool.set(k, entry(k))
    assert_entry(pool.get(1), 1)  # a read must not protect key 1 under FIFO
    pool.set(4, entry(4))
    assert sorted(pool.keys()) == [2, 3, 4]
    pool.set(5, entry(5))
    assert sorted(pool.keys()) == [3, 4, 5]
    for k in (3, 4, 5):
        assert_entry(pool.get(k), k)
    assert pool.get(1) is None and pool.get(2) is None
    assert pool.stats_snapshot().evictions == 2
    pool.check()


def test_pool_lru_eviction_read_makes_entry_most_recent() -> None:
    """LRU evicts the least recently used entry; a get refreshes an entry."""
    pool = pool_of(3, EvictionStrategy.LRU)
    for k in (1, 2, 3):
        pool.set(k, entry(k))
    assert_entry(pool.get(1), 1)  # order now 2, 3, 1
    pool.set(4, entry(4))  # evicts 2
    assert sorted(pool.keys()) == [1, 3, 4]
    assert_entry(pool.get(3), 3)  # order now 1, 4, 3
    pool.set(5, entry(5))  # evicts 1
    assert sorted(pool.keys()) == [3, 4, 5]
    for k in (3, 4, 5):
        assert_entry(pool.get(k), k)
    pool.check()


def test_pool_stats_collection() -> None:
    """hits, misses, evictions, inserts and updates are each counted exactly once per event."""
    pool = pool_of(2)
    pool.set(1, entry(1))  # insert
    pool.set(2, entry(2))  # insert
    assert pool.get(1) is not None  # hit
    assert pool.get(3) is None  # miss
    pool.set(1, entry(10))  # update in place
    pool.set(3, entry(3))  # insert, evicts 1 (oldest insertion)
    assert pool.get(1) is None  # miss
    assert pool.delete(2) is True  # a delete is not an eviction
    s = pool.stats_snapshot()
    assert (s.hits, s.misses, s.evictions, s.inserts, s.updates) == (1, 2, 1, 3, 1)
    assert s.total_queries == 3
    assert s.hit_rate == pytest.approx(1 / 3)
    assert pool.stats == s  # the live counters agree with the snapshot
    pool.check()


def test_pool_update_existing_key_in_place_fifo_order_unchanged() -> None:
    """Rewriting a key reuses its slot, replaces data and _size, and keeps its FIFO position."""
    pool = pool_of(3, EvictionStrategy.FIFO)
    slot_a = pool.set(1, entry(1, size=1))
    pool.set(2, entry(2))
    pool.set(3, entry(3))
    nbytes = pool.nbytes
    assert pool.set(1, entry(100, size=4)) == slot_a  # same slot
    assert pool.nbytes == nbytes
    assert len(pool) == 3
    assert_entry(pool.get(1), 100, size=4)
    s = pool.stats_snapshot()
    assert (s.inserts, s.updates, s.evictions) == (3, 1, 0)
    pool.set(4, entry(4))  # FIFO order unchanged: key 1 is still the oldest
    assert sorted(pool.keys()) == [2, 3, 4]
    pool.check()


def test_pool_update_existing_key_lru_moves_to_most_recent() -> None:
    """Under LRU, rewriting a key makes it the most recent entry."""
    pool = pool_of(3, EvictionStrategy.LRU)
    for k in (1, 2, 3):
        pool.set(k, entry(k))
    slot = pool.set(1, entry(11))
    assert pool.set(1, entry(12)) == slot
    pool.set(4, entry(4))  # evicts 2, not 1
    assert sorted(pool.keys()) == [1, 3, 4]
    assert_entry(pool.get(1), 12)
    pool.check()


def test_pool_clear_empties_but_keeps_storage() -> None:
    """clear() removes every key but keeps slot storage: nbytes unchanged, next set allocates nothing."""
    pool = pool_of(4)
    for k in (1, 2, 3):
        pool.set(k, entry(k))
    nbytes = pool.nbytes
    block = pool._storage.block
    ptr = block.data_ptr()
    assert nbytes == 4 * pool.entry_spec.nbytes
    pool.clear()
    assert len(pool) == 0 and pool.keys() == []
    assert all(k not in pool for k in (1, 2, 3))
    assert pool.get(1) is None
    assert pool.nbytes == nbytes
    pool.set(5, entry(5))
    assert pool.nbytes == nbytes
    assert pool._storage.block is block and block.data_ptr() == ptr
    assert_entry(pool.get(5), 5)
    # The pool is fully usable again: fill it and overflow it.
    for k in range(6, 12):
        pool.set(k, entry(k))
    assert sorted(pool.keys()) == [8, 9, 10, 11]
    pool.check()


def test_pool_priority_eviction_when_full() -> None:
    """PRIORITY evicts the lowest priority, ties oldest first, and does not crash when full."""
    pool = pool_of(3, EvictionStrategy.PRIORITY)
    pool.set(1, entry(1), priority=5.0)
    pool.set(2, entry(2), priority=1.0)
    pool.set(3, entry(3), priority=3.0)
    pool.set(4, entry(4), priority=4.0)  # evicts 2 (priority 1)
    assert sorted(pool.keys()) == [1, 3, 4]
    pool.set(5, entry(5), priority=10.0)  # evicts 3 (priority 3)
    assert sorted(pool.keys()) == [1, 4, 5]
    # A rewrite takes the new priority.
    pool.set(5, entry(50), priority=0.5)
    pool.set(6, entry(6), priority=2.0)  # evicts 5 now
    assert sorted(pool.keys()) == [1, 4, 6]
    assert_entry(pool.get(1), 1)
    assert_entry(pool.get(4), 4)
    assert_entry(pool.get(6), 6)
    pool.check()

    ties = pool_of(3, "priority")
    for k in (1, 2, 3):
        ties.set(k, entry(k))  # default priority 0.0 for all
    ties.set(4, entry(4))
    assert sorted(ties.keys()) == [2, 3, 4]  # oldest of the tie went first
    ties.set(5, entry(5))
    assert sorted(ties.keys()) == [3, 4, 5]
    assert ties.stats_snapshot().evictions == 2
    ties.check()


def test_pool_len_contains_keys() -> None:
    """len, in and keys() reflect exactly the stored keys, including after eviction."""
    pool = pool_of(3)
    assert len(pool) == 0 and pool.keys() == [] and 1 not in pool
    for k in (1, 2, 3):
        pool.set(k, entry(k))
    assert len(pool) == 3
    assert sorted(pool.keys()) == [1, 2, 3]
    assert 2 in pool and 4 not in pool
    pool.set(4, entry(4))
    assert len(pool) == 3 and 1 not in pool and 4 in pool
    assert pool.capacity == pool.pool_size == 3
    # Big keys (xxh64 range) and numpy ints work.
    big = 2**64 - 1
    pool.set(big, entry(9))
    assert big in pool and np.uint64(big) in pool
    assert_entry(pool.get(np.uint64(big)), 9)
    pool.check()


def test_pool_delete() -> None:
    """delete removes one key, reports whether it was there, and frees its slot without eviction."""
    pool = pool_of(2)
    pool.set(1, entry(1))
    pool.set(2, entry(2))
    assert pool.delete(1) is True
    assert pool.delete(1) is False
    assert 1 not in pool and pool.get(1) is None and len(pool) == 1
    pool.set(3, entry(3))  # takes the freed slot: nothing evicted
    assert sorted(pool.keys()) == [2, 3]
    assert pool.stats_snapshot().evictions == 0
    assert_entry(pool.get(2), 2)
    assert_entry(pool.get(3), 3)
    pool.check()


# -- leases -----------------------------------------------------------------------------------


def test_lease_view_is_zero_copy_and_equals_stored_data() -> None:
    """A lease yields a view over the slot itself: equal to the stored data, no copy made."""
    pool = pool_of(3)
    pool.set(1, entry(1, size=2))
    with pool.lease(1) as view:
        assert_entry(view, 1, size=2)
        block_ptr = pool._storage.block.data_ptr()
        slot_bytes = pool.entry_spec.nbytes
        ptr = caches(view)[0]._cache.data_ptr()
        assert block_ptr <= ptr < block_ptr + pool.nbytes  # inside the slot storage
        assert (ptr - block_ptr) % slot_bytes == 0
    with pool.lease(99) as missing:
        assert missing is None
    s = pool.stats_snapshot()
    assert (s.hits, s.misses) == (1, 1)
    pool.check()


def test_a_later_lease_of_a_rewritten_slot_sees_the_new_entry() -> None:
    """Leases of one slot reuse one view object; each lease refreshes its sizes and tensors."""
    pool = pool_of(1)
    slot = pool.set(1, entry(1, size=2))
    with pool.lease(1) as first, pool.lease(1) as second:
        assert_entry(first, 1, size=2)
        assert second is first  # concurrent leases of one slot share its view
        first._keys_values[0]._k_cache._cache = torch.zeros(1)  # a reader that broke the rule
    assert pool.set(2, entry(2, size=4)) == slot  # key 1 evicted, its slot rewritten
    with pool.lease(2) as view:
        assert_entry(view, 2, size=4)
        assert caches(view)[0]._cache.data_ptr() == pool._storage.block[slot].data_ptr()
    pool.check()


@pytest.mark.parametrize("strategy", ["fifo", "lru", "priority"])
def test_leased_key_is_never_evicted(strategy: str) -> None:
    """Filling a pool far beyond capacity while holding a lease never evicts the leased key."""
    pool = pool_of(3, strategy)
    pool.set(1, entry(1), priority=-100.0)  # the first victim of every strategy
    with pool.lease(1) as view:
        for k in range(2, 20):
            pool.set(k, entry(k))
            assert 1 in pool
            assert_entry(view, 1)
        assert len(pool) == 3
        assert sorted(pool.keys()) == [1, 18, 19]
        pool.check()
    pool.set(20, entry(20))
    assert 1 not in pool  # unpinned, it is the victim again
    assert sorted(pool.keys()) == [18, 19, 20]
    pool.check()


def test_rewriting_leased_key_stores_elsewhere_and_lease_keeps_old_value() -> None:
    """set() of a leased key writes another slot; the lease still sees the old value."""
    pool = pool_of(3)
    old_slot = pool.set(1, entry(1))
    pool.set(2, entry(2))
    with pool.lease(1) as view:
        new_slot = pool.set(1, entry(100, size=4))
        assert new_slot != old_slot
        assert_entry(view, 1)  # the lease is untouched
        assert_entry(pool.get(1), 100, size=4)  # readers see the new value
        assert pool.stats_snapshot().updates == 1
        pool.check()
    # After the lease ends the old slot is free again: filling the pool evicts nothing.
    pool.set(3, entry(3))
    assert pool.stats_snapshot().evictions == 0
    assert sorted(pool.keys()) == [1, 2, 3]
    for k, v in ((1, 100), (2, 2), (3, 3)):
        assert_entry(pool.get(k), v, size=4 if k == 1 else 3)
    pool.check()


def test_pool_exhausted_when_every_slot_is_leased() -> None:
    """With every slot pinned, a new key raises PoolExhaustedError and nothing changes."""
    pool = pool_of(2)
    pool.set(1, entry(1))
    pool.set(2, entry(2))
    with pool.lease(1) as v1, pool.lease(2) as v2:
        before = pool.stats_snapshot()
        with pytest.raises(PoolExhaustedError):
            pool.set(3, entry(3))
        with pytest.raises(PoolExhaustedError):  # a rewrite of a leased key needs a slot too
            pool.set(1, entry(10))
        assert pool.stats_snapshot() == before
        assert sorted(pool.keys()) == [1, 2]
        assert_entry(v1, 1)
        assert_entry(v2, 2)
        pool.check()
    pool.set(3, entry(3))  # now an unpinned victim exists
    assert sorted(pool.keys()) == [2, 3]
    assert_entry(pool.get(3), 3)
    pool.check()


def test_slots_are_reused_after_lease_exits() -> None:
    """Deleting or clearing a leased key retires its slot; when the lease ends the slot is reused."""
    pool = pool_of(2)
    pool.set(1, entry(1))
    pool.set(2, entry(2))
    with pool.lease(1) as view:
        assert pool.delete(1) is True
        assert 1 not in pool
        pool.set(3, entry(3))  # slot of key 1 is retired, so key 2 is evicted
        assert sorted(pool.keys()) == [3]
        assert_entry(view, 1)  # retired slot is not overwritten
        pool.check()
    pool.set(4, entry(4))  # the retired slot came back: no eviction
    assert sorted(pool.keys()) == [3, 4]
    assert pool.stats_snapshot().evictions == 1

    with pool.lease(3) as view3:
        pool.clear()
        pool.set(5, entry(5))  # the one free slot
        pool.set(6, entry(6))  # key 3's slot is retired, so 5 is evicted
        assert sorted(pool.keys()) == [6]
        assert pool.stats_snapshot().evictions == 2
        assert_entry(view3, 3)
        pool.check()
    pool.set(7, entry(7))  # key 3's slot is free again: no eviction
    assert sorted(pool.keys()) == [6, 7]
    assert pool.stats_snapshot().evictions == 2
    assert_entry(pool.get(6), 6)
    assert_entry(pool.get(7), 7)
    pool.check()


# --------------------------------------------------------------------------------------------
# KVCacheManager (9)
# --------------------------------------------------------------------------------------------


def small_manager(env_num: int = 3, **cfg: Any) -> KVCacheManager:
    base = {"num_simulations": 4, "init_pool_size": 4, "recur_pool_size": 6, "wm_pool_size": 2}
    base.update(cfg)
    return KVCacheManager(base, env_num=env_num)


def test_manager_isolation_between_envs() -> None:
    """The same key in two envs' init pools holds two independent entries; recur is separate."""
    m = small_manager(env_num=3)
    m.set_init_cache(0, 42, entry(1))
    m.set_init_cache(1, 42, entry(2))
    assert_entry(m.get_init_cache(0, 42), 1)
    assert_entry(m.get_init_cache(1, 42), 2)
    assert m.get_init_cache(2, 42) is None
    assert m.get_recur_cache(42) is None
    assert m.get_wm_cache(42) is None
    # Overflowing env 0's pool does not touch env 1.
    for k in range(100, 110):
        m.set_init_cache(0, k, entry(k))
    assert m.get_init_cache(0, 42) is None
    assert_entry(m.get_init_cache(1, 42), 2)
    m.clear_init_caches(1)
    assert len(m.init_pools[0]) == 4
    m.check()


def test_manager_init_recur_wm_get_set() -> None:
    """Each pool's get/set pair stores and returns private copies in its own pool."""
    m = small_manager(env_num=2)
    s_init = m.set_init_cache(1, 5, entry(5))
    s_recur = m.set_recur_cache(6, entry(6, size=1))
    s_wm = m.set_wm_cache(7, entry(7, size=4))
    assert 0 <= s_init < 4 and 0 <= s_recur < 6 and 0 <= s_wm < 2
    assert_entry(m.get_init_cache(1, 5), 5)
    assert_entry(m.get_recur_cache(6), 6, size=1)
    assert_entry(m.get_wm_cache(7), 7, size=4)
    assert (5 in m.init_pools[1], 6 in m.recur_pool, 7 in m.wm_pool) == (True, True, True)
    assert m.get_recur_cache(5) is None and m.get_wm_cache(6) is None and m.get_init_cache(1, 7) is None
    # Copies are private.
    got = m.get_recur_cache(6)
    caches(got)[0]._cache.fill_(-5.0)
    assert_entry(m.get_recur_cache(6), 6, size=1)
    # wm pool is FIFO of env_num slots.
    m.set_wm_cache(8, entry(8))
    m.set_wm_cache(9, entry(9))
    assert m.get_wm_cache(7) is None
    m.check()


def test_manager_hierarchical_get_init_first_then_recur() -> None:
    """hierarchical_get looks in env_id's init pool first, then in the recur pool."""
    m = small_manager(env_num=2)
    m.set_init_cache(0, 1, entry(10))
    m.set_recur_cache(1, entry(11))  # same key in recur: init must win
    m.set_recur_cache(2, entry(12))
    m.set_init_cache(1, 3, entry(13))
    assert_entry(m.hierarchical_get(0, 1), 10)
    assert_entry(m.hierarchical_get(1, 1), 11)  # env 1 has no key 1 at init: recur answers
    assert_entry(m.hierarchical_get(0, 2), 12)
    assert m.hierarchical_get(0, 3) is None  # env 1's root is invisible to env 0
    assert_entry(m.hierarchical_get(1, 3), 13)
    assert m.hierarchical_get(1, 99) is None
    stats = m.get_stats_summary()
    # env 0: key 1 hit init; keys 2 and 3 missed init (2 then hit recur, 3 missed it too).
    assert stats["init_pools"]["env_0"]["hits"] == 1 and stats["init_pools"]["env_0"]["misses"] == 2
    assert stats["recur_pool"]["hits"] == 2 and stats["recur_pool"]["misses"] == 2
    m.check()


def test_manager_stats_summary_structured_and_legacy_strings() -> None:
    """get_stats_summary gives per-pool dicts plus a total; as_strings=True gives 'CacheStats(...)'."""
    m = small_manager(env_num=2)
    m.set_init_cache(0, 1, entry(1))
    m.get_init_cache(0, 1)  # hit
    m.get_init_cache(1, 1)  # miss
    m.set_recur_cache(2, entry(2))
    m.get_recur_cache(2)
    m.get_recur_cache(3)
    m.get_wm_cache(4)
    s = m.get_stats_summary()
    assert s["stats_enabled"] is True
    assert set(s) == {"stats_enabled", "init_pools", "recur_pool", "wm_pool", "total"}
    assert set(s["init_pools"]) == {"env_0", "env_1"}
    keys = {"hits", "misses", "evictions", "inserts", "updates", "total_queries", "hit_rate", "miss_rate"}
    for d in (*s["init_pools"].values(), s["recur_pool"], s["wm_pool"], s["total"]):
        assert set(d) == keys
    assert s["init_pools"]["env_0"]["hits"] == 1 and s["init_pools"]["env_0"]["inserts"] == 1
    assert s["init_pools"]["env_1"]["misses"] == 1 and s["init_pools"]["env_1"]["hit_rate"] == 0.0
    assert s["recur_pool"]["hit_rate"] == pytest.approx(0.5)
    assert s["wm_pool"]["misses"] == 1
    assert s["total"]["hits"] == 2 and s["total"]["misses"] == 3 and s["total"]["inserts"] == 2
    assert s["total"]["total_queries"] == 5

    legacy = m.get_stats_summary(as_strings=True)
    assert legacy["stats_enabled"] is True
    assert set(legacy) == {"stats_enabled", "init_pools", "recur_pool", "wm_pool"}
    for text in (*legacy["init_pools"].values(), legacy["recur_pool"], legacy["wm_pool"]):
        assert isinstance(text, str) and text.startswith("CacheStats(hits=")
    assert legacy["init_pools"]["env_0"].startswith("CacheStats(hits=1, misses=0")
    assert "hits=1, misses=1" in legacy["recur_pool"]

    off = KVCacheManager({"init_pool_size": 2}, env_num=1, enable_stats=False)
    off.set_init_cache(0, 1, entry(1))
    off.get_init_cache(0, 1)
    assert off.get_stats_summary() == {"stats_enabled": False}
    assert off.init_pools[0].stats_snapshot() == StatsSnapshot()


def test_manager_flat_stats_and_reset_stats() -> None:
    """flat_stats has '<prefix>/<pool>/<counter>' keys; reset_stats zeroes counters, keeps entries."""
    m = small_manager(env_num=2)
    m.set_init_cache(1, 1, entry(1))
    m.get_init_cache(1, 1)
    m.get_recur_cache(9)
    flat = m.flat_stats()
    names = ["init_env0", "init_env1", "recurrent", "world_model"]
    counters = ["hits", "misses", "evictions", "inserts", "updates", "total_queries", "hit_rate", "miss_rate"]
    assert set(flat) == {f"kv_cache/{n}/{c}" for n in names for c in counters}
    assert flat["kv_cache/init_env1/hits"] == 1
    assert flat["kv_cache/init_env1/hit_rate"] == 1.0
    assert flat["kv_cache/recurrent/misses"] == 1
    assert flat["kv_cache/init_env0/total_queries"] == 0
    assert set(m.flat_stats("wm")) == {f"wm/{n}/{c}" for n in names for c in counters}

    m.reset_stats()
    assert all(v == 0 for v in m.flat_stats().values())
    assert_entry(m.get_init_cache(1, 1), 1)  # entries survive
    assert m.get_stats_summary()["total"]["hits"] == 1
    m.check()


def test_manager_selective_clearing() -> None:
    """clear_init_caches(env), clear_init_caches(), clear_recur_cache and clear_all clear only their pools."""

    def populate(m: KVCacheManager) -> None:
        for e in range(3):
            m.set_init_cache(e, 10 + e, entry(10 + e))
        m.set_recur_cache(20, entry(20))
        m.set_wm_cache(30, entry(30))
        m.keys_values_wm_list.append(entry(0))
        m.keys_values_wm_size_list.append(3)

    def present(m: KVCacheManager) -> Dict[str, bool]:
        return {
            "env0": 10 in m.init_pools[0],
            "env1": 11 in m.init_pools[1],
            "env2": 12 in m.init_pools[2],
            "recur": 20 in m.recur_pool,
            "wm": 30 in m.wm_pool,
        }

    m = small_manager(env_num=3)
    populate(m)
    m.clear_init_caches(1)
    assert present(m) == {"env0": True, "env1": False, "env2": True, "recur": True, "wm": True}
    assert_entry(m.get_init_cache(0, 10), 10)
    m.clear_recur_cache()
    assert present(m) == {"env0": True, "env1": False, "env2": True, "recur": False, "wm": True}
    m.clear_init_caches()
    assert present(m) == {"env0": False, "env1": False, "env2": False, "recur": False, "wm": True}
    assert_entry(m.get_wm_cache(30), 30)
    m.check()

    populate(m)
    nbytes = [p.nbytes for p in m.pools()]
    m.clear_all()
    assert not any(present(m).values())
    assert all(len(p) == 0 for p in m.pools())
    assert m.keys_values_wm_list == [] and m.keys_values_wm_size_list == []
    assert [p.nbytes for p in m.pools()] == nbytes  # storage kept for reuse
    populate(m)  # usable again
    assert all(present(m).values())
    m.check()


# --------------------------------------------------------------------------------------------
# Scenarios (2)
# --------------------------------------------------------------------------------------------


def test_scenario_realistic_workflow() -> None:
    """Roots per env, MCTS writes to recur and reads parents via hierarchical_get, recur cleared per search."""
    env_num, num_sim = 2, 5
    m = KVCacheManager({"num_simulations": num_sim, "init_pool_size": 8}, env_num=env_num)
    assert m.recur_pool.capacity == num_sim * env_num
    value: Dict[int, int] = {}  # key -> the value its entry encodes
    counter = iter(range(1, 10_000))
    reads = hits = 0

    for step in range(3):
        roots = {}
        for e in range(env_num):
            key = hash_state(_latent(1000 * step + e))
            value[key] = next(counter)
            m.set_init_cache(e, key, entry(value[key]))
            roots[e] = key
        m.clear_recur_cache()  # once per search, after the root writes
        nodes = {e: [roots[e]] for e in range(env_num)}
        for sim in range(num_sim):
            for e in range(env_num):  # reads for the whole batch ...
                parent = nodes[e][-1]
                got = m.hierarchical_get(e, parent)
                reads += 1
                hits += got is not None
                assert_entry(got, value[parent])
            for e in range(env_num):  # ... then writes
                child = hash_state(_latent(10**6 + 1000 * step + 10 * sim + e))
                value[child] = next(counter)
                m.set_recur_cache(child, entry(value[child]))
                nodes[e].append(child)
        assert len(m.recur_pool) == num_sim * env_num
        # Roots of earlier steps are still in their env's init pool.
        for e in range(env_num):
            assert_entry(m.get_init_cache(e, roots[e]), value[roots[e]])
    assert hits == reads == 3 * num_sim * env_num
    assert m.recur_pool.stats_snapshot().evictions == 0
    # Episode end of env 0.
    m.clear_init_caches(0)
    assert len(m.init_pools[0]) == 0 and len(m.init_pools[1]) == 3
    m.check()


def test_scenario_pool_overflow_no_stale_key() -> None:
    """More writes than slots: the oldest keys are gone and no key ever returns another key's data."""
    cap = 5
    pool = pool_of(cap)
    written: List[int] = []
    for k in range(1, 40):
        pool.set(k, entry(k))
        written.append(k)
        # Every key ever written either misses or returns its own data: LightZero's stale-key bug
        # returned the data of whichever key later took the slot.
        for old in written:
            got = pool.get(old)
            if old in written[-cap:]:
                assert_entry(got, old)
            else:
                assert got is None, f"stale key {old} returned data"
    assert sorted(pool.keys()) == list(range(35, 40))

    # LightZero's second bug (§6.2): a key re-inserted after clear() must survive the ring
    # reaching the key's old slot.
    pool.clear()
    pool.set(37, entry(370))
    for k in range(100, 100 + cap - 1):
        pool.set(k, entry(k))
    assert_entry(pool.get(37), 370)
    pool.set(200, entry(200))  # now 37 is the oldest and goes
    assert pool.get(37) is None
    for k in list(range(100, 100 + cap - 1)) + [200]:
        assert_entry(pool.get(k), k)
    pool.check()


# --------------------------------------------------------------------------------------------
# With real KeysValues objects (7): concurrent_kv.KeysValues and a LightZero-like stand-in
# --------------------------------------------------------------------------------------------


def real_manager(env_num: int = 2, **cfg: Any) -> KVCacheManager:
    base = {"num_simulations": 3, "init_pool_size": 4, "wm_pool_size": 2}
    base.update(cfg)
    return KVCacheManager(base, env_num=env_num)


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_basic_operations(kind: Callable[..., Any]) -> None:
    """Atari-shaped entries round-trip through every pool with exact data and sizes."""
    m = real_manager()
    src = real_entry(kind, seed=1, size=6)
    snap = data_of(src)
    m.set_init_cache(0, 1, src)
    m.set_recur_cache(2, src)
    m.set_wm_cache(3, src)
    for got in (m.get_init_cache(0, 1), m.get_recur_cache(2), m.get_wm_cache(3)):
        assert isinstance(got, KeysValues)
        assert_same_data(got, snap)
        assert got.size == 6 and len(got) == NUM_LAYERS
        assert caches(got)[0]._cache.shape == (1, NUM_HEADS, MAX_TOKENS, EMBED_DIM // NUM_HEADS)
        assert caches(got)[0]._cache.dtype == torch.float32
        assert got._keys_values[1]._v_cache.get().shape == (1, NUM_HEADS, 6, 96)
    assert m.init_pools[0].entry_spec.nbytes == 98_304  # 96 KiB, as the reference computes
    # get(out=...) copies into a caller's entry of either kind and sets its sizes.
    out = kind(1, NUM_HEADS, MAX_TOKENS, EMBED_DIM, NUM_LAYERS)
    assert m.get_init_cache(0, 1, out=out) is out
    assert_same_data(out, snap)
    m.check()


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_isolation_between_envs(kind: Callable[..., Any]) -> None:
    """The same latent key in different envs maps to each env's own entry."""
    m = real_manager(env_num=3)
    key = hash_state(_latent(1, dim=768))
    snaps = {}
    for e in range(2):
        src = real_entry(kind, seed=100 + e)
        snaps[e] = data_of(src)
        m.set_init_cache(e, key, src)
    for e in range(2):
        assert_same_data(m.get_init_cache(e, key), snaps[e])
        assert_same_data(m.hierarchical_get(e, key), snaps[e])
    assert m.get_init_cache(2, key) is None and m.hierarchical_get(2, key) is None
    m.check()


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_init_to_recur_fallback(kind: Callable[..., Any]) -> None:
    """hierarchical_get falls back to the recur pool when the env's init pool misses."""
    m = real_manager()
    root_key, child_key = hash_state(_latent(1, dim=768)), hash_state(_latent(2, dim=768))
    root, child = real_entry(kind, 1, size=4), real_entry(kind, 2, size=6)
    m.set_init_cache(1, root_key, root)
    m.set_recur_cache(child_key, child)
    assert_same_data(m.hierarchical_get(1, root_key), data_of(root))
    assert_same_data(m.hierarchical_get(1, child_key), data_of(child))
    assert_same_data(m.hierarchical_get(0, child_key), data_of(child))  # recur is shared
    assert m.hierarchical_get(0, root_key) is None
    assert m.init_pools[1].stats_snapshot().hits == 1
    assert m.recur_pool.stats_snapshot().hits == 2
    m.check()


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_eviction(kind: Callable[..., Any]) -> None:
    """Writing past the recur pool's size evicts oldest entries; survivors keep exact data."""
    m = real_manager(env_num=1, recur_pool_size=3)
    keys = [hash_state(_latent(s, dim=768)) for s in range(6)]
    snaps = {}
    for s, k in enumerate(keys):
        src = real_entry(kind, seed=s, size=s % 7)
        snaps[k] = data_of(src)
        m.set_recur_cache(k, src)
    for k in keys[:3]:
        assert m.get_recur_cache(k) is None
    for k in keys[3:]:
        assert_same_data(m.get_recur_cache(k), snaps[k])
    assert m.recur_pool.stats_snapshot().evictions == 3
    m.check()


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_stats_tracking(kind: Callable[..., Any]) -> None:
    """Hits, misses, inserts, updates and evictions track real-entry traffic."""
    m = real_manager(env_num=1, init_pool_size=2)
    k1, k2, k3 = (hash_state(_latent(s, dim=768)) for s in (1, 2, 3))
    m.set_init_cache(0, k1, real_entry(kind, 1))
    m.set_init_cache(0, k2, real_entry(kind, 2))
    m.set_init_cache(0, k2, real_entry(kind, 22))
    m.get_init_cache(0, k1)
    m.get_init_cache(0, k3)
    m.set_init_cache(0, k3, real_entry(kind, 3))
    m.hierarchical_get(0, k1)  # evicted: init miss, recur miss
    s = m.get_stats_summary()
    env0 = s["init_pools"]["env_0"]
    assert (env0["hits"], env0["misses"], env0["inserts"], env0["updates"], env0["evictions"]) == (1, 2, 3, 1, 1)
    assert env0["hit_rate"] == pytest.approx(1 / 3)
    assert s["recur_pool"]["misses"] == 1
    assert s["total"]["total_queries"] == 4
    m.check()


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_clearing(kind: Callable[..., Any]) -> None:
    """Clearing real entries empties pools; re-set entries read back exactly."""
    m = real_manager(env_num=2)
    key = hash_state(_latent(5, dim=768))
    src = real_entry(kind, 5)
    m.set_init_cache(0, key, src)
    m.set_init_cache(1, key, src)
    m.set_recur_cache(key, src)
    m.clear_init_caches(0)
    assert m.get_init_cache(0, key) is None
    assert_same_data(m.hierarchical_get(0, key), data_of(src))  # recur still has it
    m.clear_recur_cache()
    assert m.hierarchical_get(0, key) is None
    assert_same_data(m.get_init_cache(1, key), data_of(src))
    m.clear_all()
    assert all(len(p) == 0 for p in m.pools())
    other = real_entry(kind, 6, size=2)
    m.set_init_cache(0, key, other)
    assert_same_data(m.get_init_cache(0, key), data_of(other))
    m.check()


# --------------------------------------------------------------------------------------------
# Cache semantics (2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_set_deep_copies_including_non_contiguous_sources(kind: Callable[..., Any]) -> None:
    """set() copies: later mutation of the source does not reach the pool; non-contiguous
    _cache views (sliced or transposed twice) are stored with the right values."""
    pool = pool_of(4)
    src = real_entry(kind, 1, size=5)
    snap = data_of(src)
    pool.set(1, src)
    for c in caches(src):  # what LightZero's in-place pos-emb add does to the scratch view
        c._cache.add_(1.0)
        c._size = 1
    assert_same_data(pool.get(1), snap)

    # Non-contiguous sources.
    head_dim = EMBED_DIM // NUM_HEADS
    nc = kind(1, NUM_HEADS, MAX_TOKENS, EMBED_DIM, NUM_LAYERS)
    g = torch.Generator().manual_seed(9)
    expected = []
    for i, c in enumerate(caches(nc)):
        if i % 2 == 0:  # a token slice of a longer (padded) tensor
            big = torch.randn(1, NUM_HEADS, MAX_TOKENS + 3, head_dim, generator=g)
            view = big[:, :, 2 : 2 + MAX_TOKENS, :]
        else:  # transposed, made contiguous, transposed back
            base = torch.randn(1, NUM_HEADS, MAX_TOKENS, head_dim, generator=g)
            view = base.transpose(2, 3).contiguous().transpose(2, 3)
        assert not view.is_contiguous()
        c._cache = view
        c._size = 7
        expected.append(view.clone())
    pool.set(2, nc)
    got = pool.get(2)
    for c, t in zip(caches(got), expected):
        assert torch.equal(c._cache, t) and c._size == 7
    assert_same_data(pool.get(1), snap)  # the other entry is untouched
    pool.check()


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_update_existing_entry_replaces_data_and_size_exactly(kind: Callable[..., Any]) -> None:
    """Rewriting a key replaces every tensor and every _size, including per-cache sizes."""
    pool = pool_of(2)
    pool.set(1, real_entry(kind, 1, size=6))
    new = real_entry(kind, 2, size=2)
    for i, c in enumerate(caches(new)):
        c._size = i  # different size per cache: each must round-trip
    snap = data_of(new)
    pool.set(1, new)
    got = pool.get(1)
    assert_same_data(got, snap)
    assert got.size == 0  # layer-0 K size
    assert [c._size for c in caches(got)] == [0, 1, 2, 3]
    assert len(pool) == 1 and pool.stats_snapshot().updates == 1
    pool.check()


# --------------------------------------------------------------------------------------------
# Workflows (2)
# --------------------------------------------------------------------------------------------


def test_workflow_imagine_rollout() -> None:
    """An imagine-style rollout: read the previous state's cache, append tokens, store the new state."""
    m = real_manager(env_num=1, init_pool_size=2, recur_pool_size=8)
    head_dim = EMBED_DIM // NUM_HEADS
    root_key = hash_state(_latent(0, dim=768))
    m.set_init_cache(0, root_key, KeysValues(1, NUM_HEADS, MAX_TOKENS, EMBED_DIM, NUM_LAYERS))
    keys = [root_key]
    for t in range(1, 4):
        kv = m.hierarchical_get(0, keys[-1])
        assert kv is not None and kv.size == 2 * (t - 1)
        for layer_i, layer in enumerate(kv._keys_values):  # two tokens (action, obs) per step
            k = torch.full((1, NUM_HEADS, 2, head_dim), float(10 * t + layer_i))
            layer.update(k, -k)
        key = hash_state(_latent(t, dim=768))
        m.set_recur_cache(key, kv)
        keys.append(key)
        kv._keys_values[0]._k_cache._cache.zero_()  # the caller's copy is scratch
    # Every step's entry holds exactly the tokens of the steps so far.
    for t, key in enumerate(keys):
        kv = m.hierarchical_get(0, key)
        assert kv.size == 2 * t
        for layer_i, layer in enumerate(kv._keys_values):
            k, v = layer.get()
            assert k.shape == (1, NUM_HEADS, 2 * t, head_dim)
            for s in range(1, t + 1):
                want = float(10 * s + layer_i)
                assert torch.equal(k[:, :, 2 * (s - 1) : 2 * s], torch.full_like(k[:, :, :2], want))
                assert torch.equal(v[:, :, 2 * (s - 1) : 2 * s], torch.full_like(v[:, :, :2], -want))
    assert m.recur_pool.stats_snapshot().evictions == 0
    m.check()


def test_workflow_mcts_search_every_parent_read_hits() -> None:
    """An MCTS search: expand a tree per env; every parent lookup hits with the parent's data."""
    env_num, num_sim = 2, 12
    m = KVCacheManager({"num_simulations": num_sim, "init_pool_size": 4}, env_num=env_num)
    rng = random.Random(0)
    value: Dict[int, int] = {}
    serial = iter(range(1, 10_000))
    for search in range(2):
        m.clear_recur_cache()
        tree: Dict[int, List[int]] = {}
        for e in range(env_num):
            root = hash_state(_latent(500 + 10 * search + e))
            value[root] = next(serial)
            m.set_init_cache(e, root, entry(value[root], size=0))
            tree[e] = [root]
        before = m.get_stats_summary()["total"]
        for sim in range(num_sim):
            parents = {e: rng.choice(tree[e]) for e in range(env_num)}
            for e, parent in parents.items():
                got = m.hierarchical_get(e, parent)
                assert_entry(got, value[parent], size=0)
            for e, parent in parents.items():
                child = hash_state(_latent(10**5 + 1000 * search + 10 * sim + e))
                value[child] = next(serial)
                m.set_recur_cache(child, entry(value[child], size=0))
                tree[e].append(child)
        after = m.get_stats_summary()["total"]
        # Every read hit (either the root in init or a node in recur); recur never evicted.
        assert after["hits"] - before["hits"] == num_sim * env_num
        assert m.recur_pool.stats_snapshot().evictions == 0
        assert len(m.recur_pool) == num_sim * env_num
        for e in range(env_num):  # the whole tree is still readable
            for node in tree[e]:
                assert_entry(m.hierarchical_get(e, node), value[node], size=0)
    m.check()


def test_the_starting_designs_usage_example_runs_unchanged() -> None:
    """starting-design.md's example, word for word apart from the import line."""
    from concurrent_kv import KVCacheManager

    config = types.SimpleNamespace(num_simulations=50, game_segment_length=20)
    kv_object = KeysValues(1, 8, 8, 768, 2, "cpu")
    # --- the example ---
    manager = KVCacheManager(config=config, env_num=4, enable_stats=True)
    manager.set_init_cache(env_id=0, cache_key=123, kv_cache=kv_object)
    kv = manager.get_init_cache(env_id=0, cache_key=123)
    stats = manager.get_stats_summary()
    # --- what it promised ---
    assert kv is not None and torch.equal(kv._block, kv_object._block)
    assert stats["stats_enabled"] is True and set(stats) >= {"init_pools", "recur_pool", "wm_pool"}
    assert stats["init_pools"]["env_0"]["hits"] == 1
    legacy_form = manager.get_stats_summary(as_strings=True)
    assert legacy_form["init_pools"]["env_0"].startswith("CacheStats(hits=1, misses=0")
