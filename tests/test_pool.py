"""concurrent_kv/pool.py: KVCachePool set/get/delete/clear/keys, eviction order, counters, copies."""

from __future__ import annotations

from typing import Any, Callable, List

import numpy as np
import pytest
import torch

from concurrent_kv import EvictionStrategy, KVCachePool

from .helpers import (
    EMBED_DIM,
    ENTRY_KINDS,
    MAX_TOKENS,
    NUM_HEADS,
    NUM_LAYERS,
    assert_entry,
    assert_same_data,
    caches,
    data_of,
    entry,
    pool_of,
    real_entry,
)

# ---------------------------------------------------------------------------------------------
# The starting design's KVCachePool behaviours (10; the lease contract is in test_leases.py)
# ---------------------------------------------------------------------------------------------


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



def test_unsized_pools_answer_empty() -> None:
    p = KVCachePool(max_bytes=1 << 20)
    assert p.delete(1) is False
    p.clear()
    assert p.keys() == [] and p.occupancy().capacity == 0
    p.check()



# ---------------------------------------------------------------------------------------------
# Cache semantics with Atari-shaped entries, of concurrent_kv and of a LightZero-like stand-in (2)
# ---------------------------------------------------------------------------------------------


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



# ---------------------------------------------------------------------------------------------
# Scenario: more writes than slots (LightZero's stale-key bugs)
# ---------------------------------------------------------------------------------------------


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
