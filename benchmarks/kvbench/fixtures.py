"""The pools, managers and entries the measurements run on, built the same way everywhere."""

from __future__ import annotations

from typing import Any

from concurrent_kv import EntrySpec, KVCacheManager, KVCachePool
from concurrent_kv.testing.lightzero_layout import in_lightzero_layout
from concurrent_kv.workload import fill_entry

from .settings import SIZES


def make_pool(spec: EntrySpec, policy: str, backend: str, slots: int) -> KVCachePool:
    """A pool of ``slots`` for ``backend``: an in-process lock kind, or ``shared`` memory."""
    if backend == "shared":
        return KVCachePool(slots, policy, shared=True, entry_spec=spec, name="bench")
    return KVCachePool(slots, policy, entry_spec=spec, lock=backend)


def make_bench_manager(spec: EntrySpec, policy: str, backend: str, slots: int) -> KVCacheManager:
    """One env: a small init pool and a recur pool of ``slots``, both with ``policy``."""
    config = {"num_simulations": 25, "init_pool_size": 16, "recur_pool_size": slots, "wm_pool_size": 1,
              "init_eviction_strategy": policy, "recur_eviction_strategy": policy,
              "lock": "rw" if backend == "shared" else backend}
    return KVCacheManager(config, 1, shared=backend == "shared", entry_spec=spec)


def fill_pool(pool: Any, entry: Any, slots: int) -> None:
    """Store ``entry`` under keys 0 .. slots-1 (any pool with ``set``): a full pool, the hot key in it."""
    for k in range(slots):
        pool.set(k, entry)


def filled(size: str, key: int) -> Any:
    """A new entry of ``size`` that encodes ``key``."""
    return fill_entry(SIZES[size].empty_entry(), key)


def foreign(size: str, key: int) -> Any:
    """The same, in LightZero's own layout: a tensor per K/V cache."""
    return in_lightzero_layout(filled(size, key))
