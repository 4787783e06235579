"""concurrent_kv/pool.py, validation: KVCachePool and Lease reject bad input with typed errors.

Every public call of the pool rejects bad input with a specific error class, and a rejected call
changes nothing already stored (see ``validation_helpers.assert_rejected``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch

from concurrent_kv import EntrySpec, EvictionStrategy, KVCachePool
from concurrent_kv.errors import (
    ClosedError,
    ConfigError,
    EntryMismatchError,
    InvalidEntryError,
    InvalidKeyError,
    InvalidPriorityError,
    PoolExhaustedError,
)

from .validation_helpers import (
    HEAD_DIM,
    HEADS,
    LAYERS,
    TOKENS,
    assert_entry,
    assert_raises,
    assert_rejected,
    caches,
    entry,
    populated_pool,
)

# ---------------------------------------------------------------------------------------------
# KVCachePool constructor and sizing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs",
    [
        pytest.param((), {}, id="neither-size"),
        pytest.param((4,), {"max_bytes": 4096}, id="both-sizes"),
        pytest.param((0,), {}, id="pool_size-0"),
        pytest.param((-3,), {}, id="pool_size-negative"),
        pytest.param((True,), {}, id="pool_size-bool"),
        pytest.param((4.0,), {}, id="pool_size-float"),
        pytest.param(("4",), {}, id="pool_size-str"),
        pytest.param((), {"max_bytes": 0}, id="max_bytes-0"),
        pytest.param((), {"max_bytes": -1}, id="max_bytes-negative"),
        pytest.param((), {"max_bytes": True}, id="max_bytes-bool"),
        pytest.param((), {"max_bytes": 4096.0}, id="max_bytes-float"),
        pytest.param((4, "random"), {}, id="strategy-unknown-name"),
        pytest.param((4, ""), {}, id="strategy-empty"),
        pytest.param((4, 3), {}, id="strategy-int"),
        pytest.param((4, None), {}, id="strategy-None"),
        pytest.param((4, dict), {}, id="strategy-not-a-policy-class"),
        pytest.param((4,), {"lock": "spinlock"}, id="lock-unknown"),
        pytest.param((4,), {"lock": 3}, id="lock-int"),
        pytest.param((4,), {"lock": None}, id="lock-None"),
        pytest.param((4,), {"lock_timeout": 0}, id="timeout-0"),
        pytest.param((4,), {"lock_timeout": -1.0}, id="timeout-negative"),
        pytest.param((4,), {"lock_timeout": math.nan}, id="timeout-nan"),
        pytest.param((4,), {"lock_timeout": math.inf}, id="timeout-inf"),
        pytest.param((4,), {"lock_timeout": True}, id="timeout-bool"),
        pytest.param((4,), {"lock_timeout": "1"}, id="timeout-str"),
        pytest.param((4,), {"enable_stats": 1}, id="enable_stats-int"),
        pytest.param((4,), {"enable_stats": "yes"}, id="enable_stats-str"),
        pytest.param((4,), {"name": 5}, id="name-int"),
        pytest.param((4,), {"entry_spec": "spec"}, id="entry_spec-str"),
        pytest.param((4,), {"entry_spec": (2, 1, 2, 4, 4)}, id="entry_spec-tuple"),
    ],
)
def test_pool_constructor_rejects(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Bad constructor arguments raise ConfigError (a ValueError)."""
    assert_raises(ConfigError, ValueError, lambda: KVCachePool(*args, **kwargs))



@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((4,), {}),
        ((4, "LRU"), {}),
        ((4, EvictionStrategy.PRIORITY), {}),
        ((1,), {"lock": "mutex", "lock_timeout": 0.5}),
        ((), {"max_bytes": 10**6}),
        ((2,), {"entry_spec": EntrySpec(LAYERS, 1, HEADS, TOKENS, HEAD_DIM)}),
    ],
)
def test_pool_constructor_accepts_valid_arguments(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """The validation is not over-eager: valid forms construct a working pool."""
    pool = KVCachePool(*args, **kwargs)
    pool.set(1, entry(1.0))
    assert_entry(pool.get(1), 1.0)
    pool.check()



def test_pool_max_bytes_smaller_than_one_entry() -> None:
    """max_bytes below one entry: the first set raises EntryMismatchError and leaves the pool unsized."""
    pool = KVCachePool(max_bytes=16)
    assert_raises(EntryMismatchError, ValueError, lambda: pool.set(1, entry(1.0)))
    assert pool.capacity is None and pool.entry_spec is None and pool.nbytes == 0 and len(pool) == 0
    assert 1 not in pool and pool.keys() == []
    pool.check()



def test_max_bytes_pool_get_before_first_entry_is_a_miss() -> None:
    """A pool sized by max_bytes answers get() with a counted miss before its first entry
    (it has no slots yet, but a lookup is still a valid call)."""
    pool = KVCachePool(max_bytes=10**6)
    assert pool.get(1) is None
    assert pool.stats_snapshot().misses == 1
    with pool.lease(1) as view:
        assert view is None
    pool.set(1, entry(1.0))
    assert pool.capacity == 10**6 // pool.entry_spec.nbytes
    assert_entry(pool.get(1), 1.0)
    pool.check()



# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------

BAD_KEYS = [
    pytest.param("10", id="str"),
    pytest.param(b"10", id="bytes"),
    pytest.param(10.0, id="float"),
    pytest.param(math.nan, id="nan"),
    pytest.param(None, id="None"),
    pytest.param(True, id="True"),
    pytest.param(False, id="False"),
    pytest.param(np.bool_(True), id="np.bool_"),
    pytest.param(-1, id="negative"),
    pytest.param(np.int64(-1), id="np-negative"),
    pytest.param(2**64, id="2**64"),
    pytest.param(2**70, id="2**70"),
    pytest.param([10], id="list"),
    pytest.param((10,), id="tuple"),
    pytest.param(np.float32(10), id="np.float32"),
    pytest.param(torch.tensor(10), id="torch-scalar"),
]



@pytest.mark.parametrize("key", BAD_KEYS)
def test_set_rejects_bad_key(key: Any) -> None:
    """set() with a key that is not an int in [0, 2**64) raises InvalidKeyError (a TypeError)."""
    pool = populated_pool()
    assert_rejected(pool, InvalidKeyError, TypeError, lambda: pool.set(key, entry(9.0)))



@pytest.mark.parametrize("key", BAD_KEYS)
def test_get_lease_delete_contains_reject_bad_key(key: Any) -> None:
    """get, lease, delete and ``in`` reject the same keys, counting nothing."""
    pool = populated_pool()
    assert_rejected(pool, InvalidKeyError, TypeError, lambda: pool.get(key))
    assert_rejected(pool, InvalidKeyError, TypeError, lambda: pool.lease(key))
    assert_rejected(pool, InvalidKeyError, TypeError, lambda: pool.delete(key))
    assert_rejected(pool, InvalidKeyError, TypeError, lambda: key in pool)



@pytest.mark.parametrize("key", [0, 2**64 - 1, np.uint64(2**64 - 1), np.int32(7), np.int64(12)])
def test_valid_key_forms_are_accepted(key: Any) -> None:
    """0, 2**64-1 and numpy integers are valid keys and address the same entry as the int."""
    pool = populated_pool()
    pool.set(key, entry(9.0))
    assert int(key) in pool and key in pool
    assert_entry(pool.get(int(key)), 9.0)
    assert_entry(pool.get(key), 9.0)
    assert pool.delete(key) is True
    pool.check()



# ---------------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------------


class _Obj:
    """A bag of attributes, to build broken KeysValues look-alikes."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)



def _lz_like(tensors: List[Any], sizes: List[Any]) -> _Obj:
    """A LightZero-like KeysValues over given per-cache tensors and sizes."""
    layers = []
    for i in range(0, len(tensors), 2):
        layers.append(
            _Obj(
                _k_cache=_Obj(_cache=tensors[i], _size=sizes[i]),
                _v_cache=_Obj(_cache=tensors[i + 1], _size=sizes[i + 1]),
            )
        )
    return _Obj(_keys_values=tuple(layers))



def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*(shape or (1, HEADS, TOKENS, HEAD_DIM)), dtype=dtype)



NOT_ENTRIES = [
    pytest.param(lambda: None, id="None"),
    pytest.param(lambda: torch.zeros(2 * LAYERS, 1, HEADS, TOKENS, HEAD_DIM), id="bare-tensor"),
    pytest.param(lambda: {"_keys_values": ()}, id="dict"),
    pytest.param(lambda: "kv", id="str"),
    pytest.param(lambda: 42, id="int"),
    pytest.param(lambda: _Obj(_keys_values=()), id="no-layers"),
    pytest.param(lambda: _Obj(_keys_values=5), id="keys_values-int"),
    pytest.param(lambda: _Obj(_keys_values=(_Obj(_k_cache=None),)), id="layer-without-v"),
    pytest.param(lambda: _lz_like([np.zeros((1, HEADS, TOKENS, HEAD_DIM), np.float32), _t()] * LAYERS, [3] * 4), id="numpy-cache"),
    pytest.param(lambda: _lz_like([_t()] * 4, [3.0, 3, 3, 3]), id="size-float"),
    pytest.param(lambda: _lz_like([_t()] * 4, [True, 3, 3, 3]), id="size-bool"),
    pytest.param(lambda: _lz_like([_t()] * 4, [None, 3, 3, 3]), id="size-None"),
    pytest.param(lambda: _lz_like([_t()] * 4, ["3", 3, 3, 3]), id="size-str"),
]



@pytest.mark.parametrize("make", NOT_ENTRIES)
def test_set_rejects_non_entries(make: Callable[[], Any]) -> None:
    """Objects without LightZero's KeysValues surface raise InvalidEntryError (a TypeError)."""
    pool = populated_pool()
    assert_rejected(pool, InvalidEntryError, TypeError, lambda: pool.set(13, make()))
    assert_rejected(pool, InvalidEntryError, TypeError, lambda: pool.set(10, make()))  # existing key



@pytest.mark.parametrize("make", NOT_ENTRIES)
def test_unformatted_pool_rejects_non_entries_and_stays_unformatted(make: Callable[[], Any]) -> None:
    """A rejected first entry does not fix the pool's slot shape or allocate storage."""
    pool = KVCachePool(4)
    assert_raises(InvalidEntryError, TypeError, lambda: pool.set(1, make()))
    assert pool.entry_spec is None and pool.nbytes == 0 and len(pool) == 0
    pool.set(1, entry(1.0, tokens=6))  # any shape may still come first
    assert pool.entry_spec.max_tokens == 6
    pool.check()



MISMATCHED = [
    pytest.param(lambda: entry(9.0, layers=1), id="one-layer"),
    pytest.param(lambda: entry(9.0, layers=3), id="three-layers"),
    pytest.param(lambda: entry(9.0, heads=4), id="heads"),
    pytest.param(lambda: entry(9.0, tokens=8), id="tokens"),
    pytest.param(lambda: entry(9.0, embed=16), id="head_dim"),
    pytest.param(lambda: entry(9.0, n=2), id="num_samples"),
    pytest.param(lambda: entry(9.0, dtype=torch.float64), id="float64"),
    pytest.param(lambda: entry(9.0, dtype=torch.float16), id="float16"),
    pytest.param(lambda: entry(9.0, device="meta"), id="meta-device"),
    pytest.param(lambda: entry(9.0, size=-1), id="size-negative"),
    pytest.param(lambda: entry(9.0, size=TOKENS + 1), id="size-too-big"),
    pytest.param(lambda: _lz_like([_t()] * 3 + [_t(1, HEADS, TOKENS + 1, HEAD_DIM)], [3] * 4), id="lz-one-bad-shape"),
    pytest.param(lambda: _lz_like([_t()] * 4, [3, 3, 3, TOKENS + 1]), id="lz-size-too-big"),
    pytest.param(lambda: _lz_like([_t()] * 4, [3, np.int64(-2), 3, 3]), id="lz-size-np-negative"),
    pytest.param(lambda: _lz_like([_t(dtype=torch.float64)] * 4, [3] * 4), id="lz-float64"),
    pytest.param(lambda: _lz_like([_t(1, HEADS, TOKENS)] * 4, [3] * 4), id="lz-3d"),
    pytest.param(lambda: _lz_like([_t()] * 6, [3] * 6), id="lz-three-layers"),
]



@pytest.mark.parametrize("make", MISMATCHED)
def test_set_rejects_entries_that_do_not_fit_the_slots(make: Callable[[], Any]) -> None:
    """Wrong layer count, shape, dtype, device or _size raises EntryMismatchError (a ValueError)."""
    pool = populated_pool()
    assert_rejected(pool, EntryMismatchError, ValueError, lambda: pool.set(13, make()))
    # A rejected rewrite of an existing key keeps the old value.
    assert_rejected(pool, EntryMismatchError, ValueError, lambda: pool.set(11, make()))



def test_mismatch_with_a_non_contiguous_block_breaker() -> None:
    """An entry of the pool's type whose one cache was swapped for a wrong-shape tensor is rejected."""
    pool = populated_pool()
    kv = entry(9.0)
    kv._keys_values[1]._v_cache._cache = torch.zeros(1, HEADS, TOKENS + 2, HEAD_DIM)[:, :, 1 : TOKENS + 1][..., :2]
    assert_rejected(pool, EntryMismatchError, ValueError, lambda: pool.set(10, kv))



# ---------------------------------------------------------------------------------------------
# priorities, and a pool whose every slot is leased
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "priority",
    [
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="inf"),
        pytest.param(-math.inf, id="-inf"),
        pytest.param(np.float64("nan"), id="np-nan"),
        pytest.param("1.0", id="str"),
        pytest.param(True, id="bool"),
        pytest.param([1.0], id="list"),
        pytest.param(1 + 2j, id="complex"),
    ],
)
@pytest.mark.parametrize("strategy", ["fifo", "priority"])
def test_set_rejects_bad_priority(priority: Any, strategy: str) -> None:
    """A priority that is not a finite real raises InvalidPriorityError (a ValueError), in any pool."""
    pool = populated_pool(strategy)
    assert_rejected(pool, InvalidPriorityError, ValueError, lambda: pool.set(13, entry(9.0), priority=priority))
    assert_rejected(pool, InvalidPriorityError, ValueError, lambda: pool.set(10, entry(9.0), priority=priority))



@pytest.mark.parametrize("priority", [0, -5, 2.5, np.float32(1.5), np.int64(3)])
def test_valid_priorities_are_accepted(priority: Any) -> None:
    pool = populated_pool("priority")
    pool.set(13, entry(9.0), priority=priority)
    assert_entry(pool.get(13), 9.0)
    pool.check()



def test_pool_exhausted_rejection_changes_nothing() -> None:
    """PoolExhaustedError (a RuntimeError) when every slot is leased; nothing changes."""
    pool = KVCachePool(2)
    stored = {1: 1.0, 2: 2.0}
    for k, v in stored.items():
        pool.set(k, entry(v))
    with pool.lease(1), pool.lease(2):
        before = pool.stats_snapshot()
        assert_raises(PoolExhaustedError, RuntimeError, lambda: pool.set(3, entry(3.0)))
        assert_raises(PoolExhaustedError, RuntimeError, lambda: pool.set(1, entry(3.0)))
        assert pool.stats_snapshot() == before
        assert sorted(pool.keys()) == [1, 2]
        pool.check()
    assert_entry(pool.get(1), 1.0)
    assert_entry(pool.get(2), 2.0)
    pool.check()



# ---------------------------------------------------------------------------------------------
# get(out=...)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_out, exc, builtin",
    [
        pytest.param(lambda: entry(-7.0, heads=4), EntryMismatchError, ValueError, id="heads"),
        pytest.param(lambda: entry(-7.0, layers=1), EntryMismatchError, ValueError, id="layers"),
        pytest.param(lambda: entry(-7.0, dtype=torch.float64), EntryMismatchError, ValueError, id="float64"),
        pytest.param(lambda: entry(-7.0, tokens=2), EntryMismatchError, ValueError, id="tokens"),
        pytest.param(lambda: torch.zeros(1), InvalidEntryError, TypeError, id="tensor"),
        pytest.param(lambda: "out", InvalidEntryError, TypeError, id="str"),
    ],
)
@pytest.mark.parametrize("key", [10, 99], ids=["hit-key", "miss-key"])
def test_get_rejects_mismatched_out(make_out: Callable[[], Any], exc: Any, builtin: Any, key: int) -> None:
    """get(out=) with an out of the wrong shape/type is rejected before any read; out is untouched."""
    pool = populated_pool()
    out = make_out()
    snapshot = [(c._cache.clone(), c._size) for c in caches(out)] if hasattr(out, "_keys_values") else None
    assert_rejected(pool, exc, builtin, lambda: pool.get(key, out=out))
    if snapshot is not None:
        for c, (t, s) in zip(caches(out), snapshot):
            assert torch.equal(c._cache, t) and c._size == s



def test_get_with_matching_out_is_accepted() -> None:
    """A matching out (any _size) receives the entry in place."""
    pool = populated_pool()
    out = entry(-1.0, size=0)
    assert pool.get(11, out=out) is out
    assert_entry(out, 2.0)
    assert pool.get(99, out=out) is None
    assert_entry(out, 2.0)  # a miss leaves out alone



# ---------------------------------------------------------------------------------------------
# closed pools, and leases used twice
# ---------------------------------------------------------------------------------------------

POOL_CALLS = [
    pytest.param(lambda p: p.get(10), id="get"),
    pytest.param(lambda p: p.get(99), id="get-miss"),
    pytest.param(lambda p: p.set(10, entry(1.0)), id="set-existing"),
    pytest.param(lambda p: p.set(13, entry(1.0)), id="set-new"),
    pytest.param(lambda p: p.lease(10), id="lease"),
    pytest.param(lambda p: p.delete(10), id="delete"),
    pytest.param(lambda p: 10 in p, id="contains"),
    pytest.param(lambda p: p.keys(), id="keys"),
    pytest.param(lambda p: p.clear(), id="clear"),
    pytest.param(lambda p: p.check(), id="check"),
]



@pytest.mark.parametrize("call", POOL_CALLS)
def test_pool_methods_after_close_raise_closed_error(call: Callable[[KVCachePool], Any]) -> None:
    """After close(), every data-path method raises ClosedError (a RuntimeError)."""
    pool = populated_pool()
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    assert_raises(ClosedError, RuntimeError, lambda: call(pool))
    assert pool.nbytes == 0 and len(pool) == 0



def test_lease_made_before_close_cannot_be_entered_after() -> None:
    """A Lease object created while open raises ClosedError when entered after close()."""
    pool = populated_pool()
    lease = pool.lease(10)
    pool.close()
    with pytest.raises(ClosedError):
        with lease:
            pass



def test_lease_entered_twice_is_refused() -> None:
    """A Lease is single-use; re-entering it raises RuntimeError and leaves no pin behind."""
    pool = populated_pool()
    lease = pool.lease(10)
    with lease as view:
        assert_entry(view, 1.0)
    with pytest.raises(RuntimeError):
        lease.__enter__()
    pool.clear()  # an unbalanced pin would leave a retired slot and break check()
    pool.check()
