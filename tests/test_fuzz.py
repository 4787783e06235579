"""Every public entry point (pool, manager, config, shm, adapter): hypothesis fuzzing with hostile input.

Each call either succeeds (the input happened to be valid) or raises an error from
``concurrent_kv.errors`` (never a bare TypeError, AttributeError, OverflowError...), and a
rejected call leaves the pool's contents and counters exactly as they were.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concurrent_kv import (
    ConcurrentKVError,
    EntrySpec,
    KeysValues,
    KVCacheManager,
    KVCachePool,
    ManagerConfig,
    hash_state,
)
from concurrent_kv.integrations.lightzero import attach
from concurrent_kv.workload import fill_entry

SPEC = EntrySpec(num_layers=1, num_samples=1, num_heads=2, max_tokens=4, head_dim=4)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CASES: List[int] = [0]  # how many hostile calls were made, for the closing report

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool])
tensors = st.builds(lambda s, d: torch.zeros(s, dtype=d), shapes, dtypes)
wrong_entries = st.builds(
    lambda layers, heads, tokens, dim, dtype: KeysValues(1, heads, tokens, heads * dim, layers, "cpu", dtype),
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), dtypes,
)
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(), max_size=3), st.tuples(st.integers()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), tensors, wrong_entries,
    st.just(object()), st.just(np.float64(math.nan)), st.just(np.int64(-1)), st.just(np.uint64(2**64 - 1)),
)


def hostile(call: Callable[[], Any]) -> bool:
    """Run ``call``; True if it raised one of ours, False if it succeeded; anything else fails."""
    CASES[0] += 1
    try:
        call()
    except ConcurrentKVError:
        return True
    return False


def populated_pool(strategy: str = "fifo") -> KVCachePool:
    pool = KVCachePool(4, strategy, entry_spec=SPEC)
    for k in range(3):
        pool.set(k, fill_entry(SPEC.empty_entry(), k))
    return pool


def snapshot(pool: KVCachePool) -> Any:
    contents = []
    for key in sorted(pool.keys()):
        with pool.lease(key) as view:  # counted as hits: compare stats taken around the call only
            contents.append((key, view._block.clone(), tuple(c._size for c in view._caches())))
    return contents


def same(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(
        ka == kb and torch.equal(ta, tb) and sa == sb for (ka, ta, sa), (kb, tb, sb) in zip(a, b))


@FUZZ
@given(key=junk, entry=st.one_of(junk, st.just(fill_entry(SPEC.empty_entry(), 1))), priority=st.one_of(st.none(), junk))
def test_pool_set_with_hostile_input(key: Any, entry: Any, priority: Any) -> None:
    pool = populated_pool("priority")
    before, stats = snapshot(pool), pool.stats_snapshot()
    if hostile(lambda: pool.set(key, entry, priority)):
        assert pool.stats_snapshot() == stats  # first: the snapshot's leases count as hits
        assert same(snapshot(pool), before)
    pool.check()


@FUZZ
@given(key=junk, out=st.one_of(st.none(), junk))
def test_pool_reads_with_hostile_input(key: Any, out: Any) -> None:
    pool = populated_pool("lru")
    before = snapshot(pool)
    for call in (lambda: pool.get(key, out=out), lambda: pool.lease(key).__enter__(), lambda: pool.delete(key),
                 lambda: key in pool):
        stats = pool.stats_snapshot()
        if hostile(call):
            assert pool.stats_snapshot() == stats
    if not isinstance(key, (int, np.integer)) or isinstance(key, (bool, np.bool_)):
        assert same(snapshot(pool), before)  # a non-int key can never delete anything
    pool.check()


@FUZZ
@given(size=junk, strategy=junk, stats=junk, name=junk, max_bytes=st.one_of(st.none(), junk), lock=junk, timeout=junk)
def test_pool_constructor_with_hostile_input(size, strategy, stats, name, max_bytes, lock, timeout) -> None:
    hostile(lambda: KVCachePool(size, strategy, stats, name, max_bytes=max_bytes, lock=lock, lock_timeout=timeout))


@FUZZ
@given(field=st.sampled_from([f.name for f in dataclasses.fields(ManagerConfig)]), value=junk,
       form=st.sampled_from(["dict", "object"]))
def test_config_parsing_with_hostile_values(field: str, value: Any, form: str) -> None:
    raw = {field: value}
    config = raw if form == "dict" else type("Cfg", (), raw)()
    hostile(lambda: KVCacheManager(config, 2))


@FUZZ
@given(env=junk, key=junk, entry=junk)
def test_manager_calls_with_hostile_input(env: Any, key: Any, entry: Any) -> None:
    manager = KVCacheManager({"num_simulations": 2, "init_pool_size": 4}, 2, entry_spec=SPEC)
    manager.set_recur_cache(1, fill_entry(SPEC.empty_entry(), 1))
    manager.set_init_cache(0, 2, fill_entry(SPEC.empty_entry(), 2))
    before = [snapshot(p) for p in manager.pools()]
    for call in (lambda: manager.get_init_cache(env, key), lambda: manager.set_init_cache(env, key, entry),
                 lambda: manager.hierarchical_get(env, key), lambda: manager.set_recur_cache(key, entry),
                 lambda: manager.set_wm_cache(key, entry), lambda: manager.clear_init_caches(env)):
        if hostile(call):
            assert all(same(snapshot(p), b) for p, b in zip(manager.pools(), before))
    manager.check()


@FUZZ
@given(value=junk)
def test_attach_hash_and_spec_with_hostile_input(value: Any) -> None:
    hostile(lambda: KVCachePool.attach(value))
    hostile(lambda: KVCacheManager.attach(value))
    hostile(lambda: hash_state(value))
    hostile(lambda: EntrySpec(value, 1, 1, 1, 1))
    hostile(lambda: EntrySpec(1, 1, 1, 1, 1, dtype=value))
    hostile(lambda: EntrySpec(1, 1, 1, 1, 1, device=value))
    hostile(lambda: attach(value))


@FUZZ
@given(mode=junk, on_mismatch=junk, compare=junk)
def test_adapter_options_with_hostile_input(mode: Any, on_mismatch: Any, compare: Any) -> None:
    from .test_lightzero_adapter import StandInWorldModel

    hostile(lambda: attach(StandInWorldModel(), mode=mode, on_mismatch=on_mismatch, compare=compare))


def test_report_case_count() -> None:
    """Not a check: prints how many hostile calls this module made (for the closing note)."""
    print(f"\nhostile calls made by tests/test_fuzz.py: {CASES[0]}")
    assert CASES[0] >= 0


@pytest.mark.parametrize("config", [{"recur_pool_size": 10**9}, {"num_simulations": 10**12},
                                    {"init_pool_size": 5 * 10**6}, {"wm_pool_size": 2**40}])
def test_huge_sizes_are_refused_before_any_allocation(config: dict) -> None:
    """Found by fuzzing: a 'valid' but absurd size exhausted the machine's memory."""
    with pytest.raises(ConcurrentKVError, match="at most"):
        KVCacheManager(config, 2)
    with pytest.raises(ConcurrentKVError, match="at most"):
        KVCachePool(10**9)
    with pytest.raises(ConcurrentKVError, match="at most"):
        KVCachePool(max_bytes=10**15, entry_spec=SPEC)
