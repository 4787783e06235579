"""A model of LightZero's legacy KV-cache pools, written from their description
(``lightzero-unizero-kv-cache.md`` §2, §6), not copied: a fixed ring of slots, a dict key ->
slot, slots allocated on first use and refreshed with ``copy_`` per layer.

It exists to compare against: tests show each legacy bug on it and its absence in
:class:`~concurrent_kv.KVCachePool`, and benchmarks time it as the baseline. Flags select the
historical variants.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..entry import KeysValues, entry_tensors

__all__ = ["LegacyRingPool", "LegacyPriorityPool"]


class LegacyRingPool:
    """The legacy ring + dict pool.

    * ``reverse_map=False``: v0.2.0 / #292. After the ring overwrites a slot, the dict still maps
      the old key to it, so a lookup of that key returns another state's entry (bug §6.1).
    * ``reverse_map=True``: #451 / HEAD. Before a write, the key that owned the slot is removed;
      but ``clear()`` empties only the dict, not the reverse map nor the ring index, so a key
      re-inserted after a clear is deleted when the ring reaches its old slot (bug §6.2).
    * ``store_references=True``: the first ``KVCacheManager`` (before be077919) stored the
      caller's object itself, so later changes to the caller's tensors changed the cache (§6.7).
    """

    def __init__(self, pool_size: int, reverse_map: bool = True, store_references: bool = False) -> None:
        self.pool_size = pool_size
        self.reverse_map = reverse_map
        self.store_references = store_references
        self.key_to_index: Dict[Any, int] = {}
        self.index_to_key: List[Optional[Any]] = [None] * pool_size
        self.slots: List[Optional[Any]] = [None] * pool_size
        self.next_index = 0

    def set(self, key: Any, kv: Any) -> int:
        index = self.next_index
        if self.reverse_map:
            old = self.index_to_key[index]
            if old is not None:
                self.key_to_index.pop(old, None)
        if self.store_references:
            self.slots[index] = kv
        else:
            if self.slots[index] is None:  # allocate with the source's shape on first use
                tensors, _ = entry_tensors(kv)
                n, heads, tokens, head_dim = tensors[0].shape
                self.slots[index] = KeysValues(n, heads, tokens, heads * head_dim, len(tensors) // 2,
                                               tensors[0].device, tensors[0].dtype)
            self._copy_into(self.slots[index], kv)
        self.key_to_index[key] = index
        self.index_to_key[index] = key
        self.next_index = (index + 1) % self.pool_size
        return index

    @staticmethod
    @torch.no_grad()
    def _copy_into(dst: Any, src: Any) -> None:
        for d_layer, s_layer in zip(dst._keys_values, src._keys_values):  # 2 x layers copies
            d_layer._k_cache._cache.copy_(s_layer._k_cache._cache)
            d_layer._v_cache._cache.copy_(s_layer._v_cache._cache)
            d_layer._k_cache._size = s_layer._k_cache._size
            d_layer._v_cache._size = s_layer._v_cache._size

    def get(self, key: Any) -> Optional[Any]:
        """The slot's object itself (the world model then copies it into staging)."""
        index = self.key_to_index.get(key)
        return None if index is None else self.slots[index]

    def clear(self) -> None:
        self.key_to_index.clear()  # reverse map and ring index are left as they were


class LegacyPriorityPool:
    """The first ``KVCachePool``'s PRIORITY branch: priorities are never recorded, so choosing a
    victim runs ``min()`` over an empty dict and raises once the pool is full (§6.10)."""

    def __init__(self, pool_size: int) -> None:
        self.pool_size = pool_size
        self.key_to_index: Dict[Any, int] = {}
        self.priorities: Dict[int, float] = {}
        self.slots: List[Optional[Any]] = [None] * pool_size

    def set(self, key: Any, kv: Any) -> int:
        if key in self.key_to_index:
            index = self.key_to_index[key]
        elif len(self.key_to_index) < self.pool_size:
            index = len(self.key_to_index)
        else:
            index = min(self.priorities, key=self.priorities.__getitem__)  # ValueError: empty
            del self.key_to_index[next(k for k, i in self.key_to_index.items() if i == index)]
        self.slots[index] = kv
        self.key_to_index[key] = index
        return index
