"""concurrent_kv/pool.py: the lease contract of KVCachePool (zero-copy views, pinned slots, reuse)."""

from __future__ import annotations

import pytest
import torch

from concurrent_kv import PoolExhaustedError

from .helpers import assert_entry, caches, entry, pool_of


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
