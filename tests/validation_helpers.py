"""Helpers of the validation tests (test_*_validation.py, and the validation parts of test_config,
test_entry and test_keys): entries of any shape, and checks that a rejected call raised the
library's own error class and changed nothing.

Each rejection is checked for the library's own class (``concurrent_kv.errors``) *and* for the
built-in base a caller would catch (``InvalidKeyError`` is a ``TypeError``, ``ConfigError`` a
``ValueError``, ...). Calls against a populated pool are wrapped in ``assert_rejected``: counters
are compared right before and right after the failing call, then keys, data, sizes, storage and
the pool's own invariants are compared with what was written.

``entry`` and ``assert_entry`` here take the same values as the ones in ``helpers.py`` and build
the same default shape; this ``entry`` also takes other shapes (``layers=3``, ``dtype=...``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Type

import pytest
import torch

from concurrent_kv import KeysValues, KVCachePool
from concurrent_kv.errors import ConcurrentKVError

LAYERS, HEADS, TOKENS, EMBED = 2, 2, 4, 8

HEAD_DIM = EMBED // HEADS

STORED = {10: 1.0, 11: 2.0, 12: 3.0}  # key -> value of the entries in the populated pool



def caches(kv: Any) -> List[Any]:
    return [c for layer in kv._keys_values for c in (layer._k_cache, layer._v_cache)]



def entry(value: float, size: int = 3, **shape: Any) -> KeysValues:
    """A KeysValues (default: the pool's shape) whose cache ``i`` is filled with ``value + i/4``."""
    kv = KeysValues(
        shape.get("n", 1),
        shape.get("heads", HEADS),
        shape.get("tokens", TOKENS),
        shape.get("embed", EMBED),
        shape.get("layers", LAYERS),
        shape.get("device", "cpu"),
        shape.get("dtype", torch.float32),
    )
    for i, c in enumerate(caches(kv)):
        c._cache.fill_(value + i * 0.25)
        c._size = size
    return kv



def assert_entry(kv: Any, value: float, size: int = 3) -> None:
    assert kv is not None
    for i, c in enumerate(caches(kv)):
        assert torch.equal(c._cache, torch.full_like(c._cache, value + i * 0.25))
        assert c._size == size



def populated_pool(strategy: Any = "fifo") -> KVCachePool:
    """A 4-slot pool holding STORED (3 entries, one free slot)."""
    pool = KVCachePool(4, strategy, name="populated")
    for k, v in STORED.items():
        pool.set(k, entry(v))
    return pool



def assert_raises(exc: Type[BaseException], builtin: Type[BaseException], fn: Callable[[], Any]) -> BaseException:
    """``fn()`` raises ``exc``, which is also a ``builtin`` and a ConcurrentKVError."""
    assert issubclass(exc, builtin) and issubclass(exc, ConcurrentKVError)
    with pytest.raises(exc) as info:
        fn()
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, ConcurrentKVError)
    return info.value



def assert_rejected(
    pool: KVCachePool,
    exc: Type[BaseException],
    builtin: Type[BaseException],
    fn: Callable[[], Any],
    stored: Dict[int, float] = STORED,
) -> None:
    """``fn()`` is rejected and ``pool`` is exactly as it was: counters, keys, data, storage."""
    keys = sorted(pool.keys())
    assert keys == sorted(stored)
    nbytes, spec, capacity, length = pool.nbytes, pool.entry_spec, pool.capacity, len(pool)
    before = pool.stats_snapshot()
    assert_raises(exc, builtin, fn)
    assert pool.stats_snapshot() == before  # taken right before/after: no read/write was counted
    assert (pool.nbytes, pool.entry_spec, pool.capacity, len(pool)) == (nbytes, spec, capacity, length)
    assert sorted(pool.keys()) == keys
    for k, v in stored.items():
        assert_entry(pool.get(k), v)
    pool.check()
