"""LightZero's legacy cache as a :class:`~concurrent_kv.workload.CacheBackend`: one
:class:`LegacyRingPool` per env for roots, one shared for recurrent states, sized as LightZero
sizes them, no locks. The workload's collector loop runs on it unchanged, so the benchmarks
compare our manager and LightZero's rings on one operation sequence.
"""

from __future__ import annotations

from typing import Any, List, Optional

from ..entry import EntrySpec
from .legacy import LegacyRingPool

__all__ = ["LegacyRingBackend", "legacy_init_slots"]


def legacy_init_slots(num_simulations: int) -> int:
    """LightZero's init-pool size: ``min(max_cache_size=5000, max(256, 2 * num_simulations))``."""
    return min(5000, max(256, 2 * num_simulations))


class LegacyRingBackend:
    """Per-env init rings and one recur ring of ``num_simulations * env_num`` slots.

    A read copies the slot into ``out`` (LightZero's world model copies it into a staging entry),
    a hierarchical read probes the env's init ring, then the recur ring. Every slot is allocated
    here, before any timing: LightZero allocates a slot on first use and never frees it, so in a
    long-running collector every slot exists, as our manager's storage does from its start."""

    def __init__(self, env_num: int, num_simulations: int, spec: EntrySpec) -> None:
        self.spec = spec
        self.init_pools: List[LegacyRingPool] = [LegacyRingPool(legacy_init_slots(num_simulations))
                                                 for _ in range(env_num)]
        self.recur_pool = LegacyRingPool(num_simulations * env_num)
        scratch = spec.empty_entry()
        for pool in (*self.init_pools, self.recur_pool):
            for i in range(pool.pool_size):
                pool.set(-1 - i, scratch)  # keys no workload uses; cleared right after
            pool.clear()

    def _read(self, slot: Optional[Any], out: Optional[Any]) -> Optional[Any]:
        if slot is None:
            return None
        if out is None:
            out = self.spec.empty_entry()
        LegacyRingPool._copy_into(out, slot)
        return out

    def get_init_cache(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        return self._read(self.init_pools[env_id].get(cache_key), out)

    def hierarchical_get(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        slot = self.init_pools[env_id].get(cache_key)
        if slot is None:
            slot = self.recur_pool.get(cache_key)
        return self._read(slot, out)

    def get_recur_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        return self._read(self.recur_pool.get(cache_key), out)

    def set_init_cache(self, env_id: int, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        return self.init_pools[env_id].set(cache_key, kv_cache)  # rings have no priorities

    def set_recur_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        return self.recur_pool.set(cache_key, kv_cache)

    def clear_recur_cache(self) -> None:
        self.recur_pool.clear()

    def clear_init_caches(self, env_id: Optional[int] = None) -> None:
        for pool in self.init_pools if env_id is None else [self.init_pools[env_id]]:
            pool.clear()
