"""Entries in LightZero's own layout, without LightZero: one tensor per K or V cache.

LightZero's ``KeysValues`` holds per layer a ``KVCache`` whose ``_k_cache`` and ``_v_cache`` are
each a ``Cache`` with its own ``_cache`` tensor ``(n, heads, max_tokens, head_dim)`` and
``_size``. Pools read such entries by duck typing; tests and the benchmark's foreign-layout
variant use these stand-ins instead of importing lightzero.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LightZeroCache", "LightZeroKVCache", "LightZeroKeysValues", "in_lightzero_layout"]


class LightZeroCache:
    """LightZero's ``Cache``: one tensor and a valid-token count."""

    def __init__(self, n: int, num_heads: int, max_tokens: int, head_dim: int, device: Any = "cpu") -> None:
        self._cache = torch.empty(n, num_heads, max_tokens, head_dim, device=device)
        self._size = 0
        self._max_tokens = max_tokens
        self._device = self._cache.device


class LightZeroKVCache:
    """LightZero's ``KVCache``: the K and V caches of one layer."""

    def __init__(self, n: int, num_heads: int, max_tokens: int, embed_dim: int, device: Any = "cpu") -> None:
        self._k_cache = LightZeroCache(n, num_heads, max_tokens, embed_dim // num_heads, device)
        self._v_cache = LightZeroCache(n, num_heads, max_tokens, embed_dim // num_heads, device)


class LightZeroKeysValues:
    """LightZero's ``KeysValues``: a tuple of per-layer K/V caches, each a separate tensor."""

    def __init__(self, n: int, num_heads: int, max_tokens: int, embed_dim: int, num_layers: int,
                 device: Any = "cpu") -> None:
        self._keys_values = tuple(LightZeroKVCache(n, num_heads, max_tokens, embed_dim, device)
                                  for _ in range(num_layers))

    @property
    def size(self) -> int:
        return self._keys_values[0]._k_cache._size

    def __len__(self) -> int:
        return len(self._keys_values)


def in_lightzero_layout(kv: Any) -> LightZeroKeysValues:
    """A copy of any ``KeysValues``-like ``kv`` (ours or LightZero's) in LightZero's layout."""
    first = kv._keys_values[0]._k_cache._cache
    n, heads, tokens, head_dim = first.shape
    out = LightZeroKeysValues(n, heads, tokens, heads * head_dim, len(kv._keys_values), first.device)
    for src, dst in zip(kv._keys_values, out._keys_values):
        for s, d in ((src._k_cache, dst._k_cache), (src._v_cache, dst._v_cache)):
            d._cache.copy_(s._cache)
            d._size = s._size
    return out
