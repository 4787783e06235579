"""Test helpers: entries that encode their key, so every read can be verified."""

from __future__ import annotations

import torch

from concurrent_kv import EntrySpec, KeysValues
from concurrent_kv.workload import fill_entry, verify_entry

#: A small entry (2 layers, 2 heads, 4 tokens, head_dim 8): 1 KiB, fast in stress loops.
SMALL = EntrySpec(num_layers=2, num_samples=1, num_heads=2, max_tokens=4, head_dim=8)
#: LightZero's Atari entry: 2 layers, 8 heads, 8 tokens, head_dim 96, float32 = 96 KiB.
ATARI = EntrySpec(num_layers=2, num_samples=1, num_heads=8, max_tokens=8, head_dim=96)


def keyed_entry(key: int, spec: EntrySpec = SMALL) -> KeysValues:
    """A fresh entry whose data and sizes encode ``key``."""
    return fill_entry(spec.empty_entry(), key)


def is_entry_of(entry: object, key: int) -> bool:
    return verify_entry(entry, key)


def assert_leases_released_and_refillable(pool) -> None:
    """No pin is left, and a full refill (at a priority above any earlier one) takes every slot:
    retired slots are reclaimed by the writers that need them."""
    assert pool.occupancy().pins == 0
    for key in range(10_000, 10_000 + pool.capacity):
        pool.set(key, keyed_entry(key), priority=1e9)
    occ = pool.occupancy()
    assert (occ.live, occ.retired, occ.free) == (pool.capacity, 0, 0)
    pool.check()


def segment_fds() -> list:
    """This process's descriptors that point at a concurrent_kv segment."""
    import os

    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "/ckv-" in target:
            found.append(target)
    return found
