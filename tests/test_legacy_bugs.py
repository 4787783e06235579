"""LightZero's legacy cache bugs (lightzero-unizero-kv-cache.md §6): each shown on a model of the
legacy logic, and shown absent from concurrent_kv's pool."""

from __future__ import annotations

import pytest
import torch

from concurrent_kv import KVCachePool
from concurrent_kv.testing.legacy import LegacyPriorityPool, LegacyRingPool
from concurrent_kv.workload import fill_entry, verify_entry

from .helpers import SMALL


def entry(key: int):
    return fill_entry(SMALL.empty_entry(), key)


def test_stale_key_after_a_ring_overwrite() -> None:
    """§6.1: v0.2.0 kept key -> slot after the ring reused the slot: get(A) returned C's entry."""
    legacy = LegacyRingPool(2, reverse_map=False)
    ours = KVCachePool(2)
    for pool in (legacy, ours):
        for key in (1, 2, 3):  # 3 overwrites 1's slot
            pool.set(key, entry(key))
    stale = legacy.get(1)
    assert stale is not None and verify_entry(stale, 3)  # the bug: key 1 serves key 3's data
    assert ours.get(1) is None  # ours: a miss, never another key's entry
    assert verify_entry(ours.get(3), 3)
    ours.check()


def test_reverse_map_not_reset_on_clear() -> None:
    """§6.2: after clear(), a re-inserted key was deleted when the ring reached its old slot."""
    legacy = LegacyRingPool(3, reverse_map=True)
    ours = KVCachePool(3)
    for pool in (legacy, ours):
        pool.set(1, entry(1))  # slot 0 belongs to key 1
        pool.clear()
        pool.set(1, entry(1))  # re-inserted: the legacy ring puts it in slot 1
        pool.set(2, entry(2))
        pool.set(3, entry(3))  # the legacy ring wraps to slot 0, whose stale owner is key 1
    assert legacy.get(1) is None  # the bug: a live key lost (false miss, lost context)
    assert verify_entry(ours.get(1), 1)
    ours.check()


def test_priority_eviction_crashed_when_full() -> None:
    """§6.10: PRIORITY never recorded priorities: min() of an empty dict once full."""
    legacy = LegacyPriorityPool(2)
    legacy.set(1, entry(1))
    legacy.set(2, entry(2))
    with pytest.raises(ValueError):
        legacy.set(3, entry(3))
    ours = KVCachePool(2, "priority")
    ours.set(1, entry(1), priority=5.0)
    ours.set(2, entry(2), priority=1.0)
    ours.set(3, entry(3), priority=3.0)  # evicts the lowest priority, key 2
    assert sorted(ours.keys()) == [1, 3]
    ours.check()


def test_stored_references_alias_the_callers_tensors() -> None:
    """§6.7 (be077919): storing references let later in-place changes corrupt the cache."""
    legacy = LegacyRingPool(2, store_references=True)
    ours = KVCachePool(2)
    scratch = entry(1)  # the world model's batched scratch, reused for the next entry
    legacy.set(1, scratch)
    ours.set(1, scratch)
    fill_entry(scratch, 2)  # the next call overwrites its scratch in place
    assert not verify_entry(legacy.get(1), 1)  # the bug: key 1's entry now holds key 2's data
    assert verify_entry(ours.get(1), 1)


def test_returned_entries_are_private_copies() -> None:
    """The legacy get hands out the slot itself; a transformer that updates it in place then
    corrupts the cache. Ours returns a copy (and lease() is the explicit zero-copy path)."""
    legacy = LegacyRingPool(2)
    ours = KVCachePool(2)
    legacy.set(1, entry(1))
    ours.set(1, entry(1))
    for got in (legacy.get(1), ours.get(1)):
        got[0]._k_cache._cache.add_(1.0)  # the attention layer's in-place update
    assert not verify_entry(legacy.get(1), 1)
    assert verify_entry(ours.get(1), 1)


def test_legacy_model_round_trips_when_used_as_intended() -> None:
    """The model is faithful in the normal case: what it stores, it returns."""
    legacy = LegacyRingPool(4)
    for key in range(4):
        legacy.set(key, entry(key))
    assert all(verify_entry(legacy.get(key), key) for key in range(4))
    assert legacy.slots[0]._block.dtype == torch.float32
