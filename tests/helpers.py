"""Test helpers: entries that encode their key (stress and thread tests) or a value (pool, lease and
manager tests), so every read can be verified."""

from __future__ import annotations

from typing import Any, Callable, List

import pytest
import torch

from concurrent_kv import EntrySpec, EvictionStrategy, KeysValues, KVCachePool
from concurrent_kv.testing.lightzero_layout import LightZeroCache, LightZeroKVCache, LightZeroKeysValues
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


# ---------------------------------------------------------------------------------------------
# Entries whose data encode a value (the starting design's pool, lease and manager tests)
#
# ``fill`` writes ``value + i/4`` into cache ``i`` of an entry, and every read is compared exactly
# (``torch.equal``) with what was written, so a cache that hands back another key's data, a shared
# reference or a half-written slot fails loudly. Every test that mutates a pool ends with
# ``check()``, the pool's own invariant audit.
# ---------------------------------------------------------------------------------------------

# Small entries for the generic pool/manager tests: 2 layers, (1, 2 heads, 4 tokens, head_dim 4).
LAYERS, HEADS, TOKENS, EMBED = 2, 2, 4, 8



def caches(kv: Any) -> List[Any]:
    """K0, V0, K1, V1, ... ``Cache`` objects of any KeysValues-like entry."""
    return [c for layer in kv._keys_values for c in (layer._k_cache, layer._v_cache)]



def fill(kv: Any, value: float, size: int) -> Any:
    """Write ``value + i/4`` into cache ``i`` of ``kv`` (exact in float32) and set every _size."""
    for i, c in enumerate(caches(kv)):
        c._cache.fill_(float(value) + i * 0.25)
        c._size = size
    return kv



def entry(value: float, size: int = 3) -> KeysValues:
    """A small KeysValues whose data encode ``value``."""
    return fill(KeysValues(1, HEADS, TOKENS, EMBED, LAYERS), value, size)



def assert_entry(kv: Any, value: float, size: int = 3) -> None:
    """``kv`` holds exactly what ``entry(value, size)`` / ``fill(..., value, size)`` wrote."""
    assert kv is not None, f"expected an entry holding {value}, got a miss"
    cs = caches(kv)
    assert len(cs) == 2 * LAYERS
    for i, c in enumerate(cs):
        expected = torch.full_like(c._cache, float(value) + i * 0.25)
        assert torch.equal(c._cache, expected), f"cache {i}: expected value {value + i * 0.25}"
        assert c._size == size



def data_of(kv: Any) -> List[Any]:
    """A deep snapshot of an entry: each cache's tensor (cloned) and _size."""
    return [(c._cache.detach().clone(), c._size) for c in caches(kv)]



def assert_same_data(kv: Any, snapshot: List[Any]) -> None:
    got = caches(kv)
    assert len(got) == len(snapshot)
    for c, (t, s) in zip(got, snapshot):
        assert torch.equal(c._cache, t)
        assert c._size == s



def pool_of(size: int, strategy: Any = EvictionStrategy.FIFO, **kw: Any) -> KVCachePool:
    return KVCachePool(size, strategy, **kw)



def _latent(seed: int, dim: int = 16) -> torch.Tensor:
    return torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))



# ---------------------------------------------------------------------------------------------
# Atari-shaped entries: concurrent_kv.KeysValues and a LightZero-like stand-in
# ---------------------------------------------------------------------------------------------

NUM_HEADS, MAX_TOKENS, EMBED_DIM, NUM_LAYERS = 8, 8, 768, 2  # Atari defaults: 96 KiB per entry



# LightZero's layout (a tensor per cache), as the library ships it for tests and benchmarks.
LZCache, LZKVCache, LZKeysValues = LightZeroCache, LightZeroKVCache, LightZeroKeysValues



ENTRY_KINDS = [pytest.param(KeysValues, id="concurrent_kv"), pytest.param(LZKeysValues, id="lightzero_like")]



def real_entry(kind: Callable[..., Any], seed: int, size: int = 6) -> Any:
    """An Atari-shaped entry of ``kind`` with random data from ``seed``."""
    kv = kind(1, NUM_HEADS, MAX_TOKENS, EMBED_DIM, NUM_LAYERS)
    g = torch.Generator().manual_seed(seed)
    for c in caches(kv):
        c._cache.copy_(torch.randn(c._cache.shape, generator=g))
        c._size = size
    return kv
