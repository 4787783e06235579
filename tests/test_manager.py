"""concurrent_kv/manager.py: KVCacheManager's API (per-pool get/set, hierarchical_get, clears, stats).

Construction sizes and the config forms accepted are in test_config.py; rejected input in
test_manager_validation.py; threads in test_threads.py; shared managers in test_shm.py and
test_shared_paths.py.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List

import pytest
import torch

from concurrent_kv import KeysValues, KVCacheManager, StatsSnapshot, hash_state

from .helpers import (
    EMBED_DIM,
    ENTRY_KINDS,
    MAX_TOKENS,
    NUM_HEADS,
    NUM_LAYERS,
    _latent,
    assert_entry,
    assert_same_data,
    caches,
    data_of,
    entry,
    real_entry,
)

# ---------------------------------------------------------------------------------------------
# The starting design's KVCacheManager behaviours (6 here; the 3 on construction and config
# forms are in test_config.py)
# ---------------------------------------------------------------------------------------------


def small_manager(env_num: int = 3, **cfg: Any) -> KVCacheManager:
    base = {"num_simulations": 4, "init_pool_size": 4, "recur_pool_size": 6, "wm_pool_size": 2}
    base.update(cfg)
    return KVCacheManager(base, env_num=env_num)



def test_manager_isolation_between_envs() -> None:
    """The same key in two envs' init pools holds two independent entries; recur is separate."""
    m = small_manager(env_num=3)
    m.set_init_cache(0, 42, entry(1))
    m.set_init_cache(1, 42, entry(2))
    assert_entry(m.get_init_cache(0, 42), 1)
    assert_entry(m.get_init_cache(1, 42), 2)
    assert m.get_init_cache(2, 42) is None
    assert m.get_recur_cache(42) is None
    assert m.get_wm_cache(42) is None
    # Overflowing env 0's pool does not touch env 1.
    for k in range(100, 110):
        m.set_init_cache(0, k, entry(k))
    assert m.get_init_cache(0, 42) is None
    assert_entry(m.get_init_cache(1, 42), 2)
    m.clear_init_caches(1)
    assert len(m.init_pools[0]) == 4
    m.check()



def test_manager_init_recur_wm_get_set() -> None:
    """Each pool's get/set pair stores and returns private copies in its own pool."""
    m = small_manager(env_num=2)
    s_init = m.set_init_cache(1, 5, entry(5))
    s_recur = m.set_recur_cache(6, entry(6, size=1))
    s_wm = m.set_wm_cache(7, entry(7, size=4))
    assert 0 <= s_init < 4 and 0 <= s_recur < 6 and 0 <= s_wm < 2
    assert_entry(m.get_init_cache(1, 5), 5)
    assert_entry(m.get_recur_cache(6), 6, size=1)
    assert_entry(m.get_wm_cache(7), 7, size=4)
    assert (5 in m.init_pools[1], 6 in m.recur_pool, 7 in m.wm_pool) == (True, True, True)
    assert m.get_recur_cache(5) is None and m.get_wm_cache(6) is None and m.get_init_cache(1, 7) is None
    # Copies are private.
    got = m.get_recur_cache(6)
    caches(got)[0]._cache.fill_(-5.0)
    assert_entry(m.get_recur_cache(6), 6, size=1)
    # wm pool is FIFO of env_num slots.
    m.set_wm_cache(8, entry(8))
    m.set_wm_cache(9, entry(9))
    assert m.get_wm_cache(7) is None
    m.check()



def test_manager_hierarchical_get_init_first_then_recur() -> None:
    """hierarchical_get looks in env_id's init pool first, then in the recur pool."""
    m = small_manager(env_num=2)
    m.set_init_cache(0, 1, entry(10))
    m.set_recur_cache(1, entry(11))  # same key in recur: init must win
    m.set_recur_cache(2, entry(12))
    m.set_init_cache(1, 3, entry(13))
    assert_entry(m.hierarchical_get(0, 1), 10)
    assert_entry(m.hierarchical_get(1, 1), 11)  # env 1 has no key 1 at init: recur answers
    assert_entry(m.hierarchical_get(0, 2), 12)
    assert m.hierarchical_get(0, 3) is None  # env 1's root is invisible to env 0
    assert_entry(m.hierarchical_get(1, 3), 13)
    assert m.hierarchical_get(1, 99) is None
    stats = m.get_stats_summary()
    # env 0: key 1 hit init; keys 2 and 3 missed init (2 then hit recur, 3 missed it too).
    assert stats["init_pools"]["env_0"]["hits"] == 1 and stats["init_pools"]["env_0"]["misses"] == 2
    assert stats["recur_pool"]["hits"] == 2 and stats["recur_pool"]["misses"] == 2
    m.check()



def test_manager_stats_summary_structured_and_legacy_strings() -> None:
    """get_stats_summary gives per-pool dicts plus a total; as_strings=True gives 'CacheStats(...)'."""
    m = small_manager(env_num=2)
    m.set_init_cache(0, 1, entry(1))
    m.get_init_cache(0, 1)  # hit
    m.get_init_cache(1, 1)  # miss
    m.set_recur_cache(2, entry(2))
    m.get_recur_cache(2)
    m.get_recur_cache(3)
    m.get_wm_cache(4)
    s = m.get_stats_summary()
    assert s["stats_enabled"] is True
    assert set(s) == {"stats_enabled", "init_pools", "recur_pool", "wm_pool", "total"}
    assert set(s["init_pools"]) == {"env_0", "env_1"}
    keys = {"hits", "misses", "evictions", "inserts", "updates", "total_queries", "hit_rate", "miss_rate"}
    for d in (*s["init_pools"].values(), s["recur_pool"], s["wm_pool"], s["total"]):
        assert set(d) == keys
    assert s["init_pools"]["env_0"]["hits"] == 1 and s["init_pools"]["env_0"]["inserts"] == 1
    assert s["init_pools"]["env_1"]["misses"] == 1 and s["init_pools"]["env_1"]["hit_rate"] == 0.0
    assert s["recur_pool"]["hit_rate"] == pytest.approx(0.5)
    assert s["wm_pool"]["misses"] == 1
    assert s["total"]["hits"] == 2 and s["total"]["misses"] == 3 and s["total"]["inserts"] == 2
    assert s["total"]["total_queries"] == 5

    legacy = m.get_stats_summary(as_strings=True)
    assert legacy["stats_enabled"] is True
    assert set(legacy) == {"stats_enabled", "init_pools", "recur_pool", "wm_pool"}
    for text in (*legacy["init_pools"].values(), legacy["recur_pool"], legacy["wm_pool"]):
        assert isinstance(text, str) and text.startswith("CacheStats(hits=")
    assert legacy["init_pools"]["env_0"].startswith("CacheStats(hits=1, misses=0")
    assert "hits=1, misses=1" in legacy["recur_pool"]

    off = KVCacheManager({"init_pool_size": 2}, env_num=1, enable_stats=False)
    off.set_init_cache(0, 1, entry(1))
    off.get_init_cache(0, 1)
    assert off.get_stats_summary() == {"stats_enabled": False}
    assert off.init_pools[0].stats_snapshot() == StatsSnapshot()



def test_manager_flat_stats_and_reset_stats() -> None:
    """flat_stats has '<prefix>/<pool>/<counter>' keys; reset_stats zeroes counters, keeps entries."""
    m = small_manager(env_num=2)
    m.set_init_cache(1, 1, entry(1))
    m.get_init_cache(1, 1)
    m.get_recur_cache(9)
    flat = m.flat_stats()
    names = ["init_env0", "init_env1", "recurrent", "world_model"]
    counters = ["hits", "misses", "evictions", "inserts", "updates", "total_queries", "hit_rate", "miss_rate"]
    assert set(flat) == {f"kv_cache/{n}/{c}" for n in names for c in counters}
    assert flat["kv_cache/init_env1/hits"] == 1
    assert flat["kv_cache/init_env1/hit_rate"] == 1.0
    assert flat["kv_cache/recurrent/misses"] == 1
    assert flat["kv_cache/init_env0/total_queries"] == 0
    assert set(m.flat_stats("wm")) == {f"wm/{n}/{c}" for n in names for c in counters}

    m.reset_stats()
    assert all(v == 0 for v in m.flat_stats().values())
    assert_entry(m.get_init_cache(1, 1), 1)  # entries survive
    assert m.get_stats_summary()["total"]["hits"] == 1
    m.check()



def test_manager_selective_clearing() -> None:
    """clear_init_caches(env), clear_init_caches(), clear_recur_cache and clear_all clear only their pools."""

    def populate(m: KVCacheManager) -> None:
        for e in range(3):
            m.set_init_cache(e, 10 + e, entry(10 + e))
        m.set_recur_cache(20, entry(20))
        m.set_wm_cache(30, entry(30))
        m.keys_values_wm_list.append(entry(0))
        m.keys_values_wm_size_list.append(3)

    def present(m: KVCacheManager) -> Dict[str, bool]:
        return {
            "env0": 10 in m.init_pools[0],
            "env1": 11 in m.init_pools[1],
            "env2": 12 in m.init_pools[2],
            "recur": 20 in m.recur_pool,
            "wm": 30 in m.wm_pool,
        }

    m = small_manager(env_num=3)
    populate(m)
    m.clear_init_caches(1)
    assert present(m) == {"env0": True, "env1": False, "env2": True, "recur": True, "wm": True}
    assert_entry(m.get_init_cache(0, 10), 10)
    m.clear_recur_cache()
    assert present(m) == {"env0": True, "env1": False, "env2": True, "recur": False, "wm": True}
    m.clear_init_caches()
    assert present(m) == {"env0": False, "env1": False, "env2": False, "recur": False, "wm": True}
    assert_entry(m.get_wm_cache(30), 30)
    m.check()

    populate(m)
    nbytes = [p.nbytes for p in m.pools()]
    m.clear_all()
    assert not any(present(m).values())
    assert all(len(p) == 0 for p in m.pools())
    assert m.keys_values_wm_list == [] and m.keys_values_wm_size_list == []
    assert [p.nbytes for p in m.pools()] == nbytes  # storage kept for reuse
    populate(m)  # usable again
    assert all(present(m).values())
    m.check()



# ---------------------------------------------------------------------------------------------
# With Atari-shaped entries: concurrent_kv.KeysValues and a LightZero-like stand-in (6; the
# seventh, on key generation, is in test_keys.py)
# ---------------------------------------------------------------------------------------------


def real_manager(env_num: int = 2, **cfg: Any) -> KVCacheManager:
    base = {"num_simulations": 3, "init_pool_size": 4, "wm_pool_size": 2}
    base.update(cfg)
    return KVCacheManager(base, env_num=env_num)



@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_basic_operations(kind: Callable[..., Any]) -> None:
    """Atari-shaped entries round-trip through every pool with exact data and sizes."""
    m = real_manager()
    src = real_entry(kind, seed=1, size=6)
    snap = data_of(src)
    m.set_init_cache(0, 1, src)
    m.set_recur_cache(2, src)
    m.set_wm_cache(3, src)
    for got in (m.get_init_cache(0, 1), m.get_recur_cache(2), m.get_wm_cache(3)):
        assert isinstance(got, KeysValues)
        assert_same_data(got, snap)
        assert got.size == 6 and len(got) == NUM_LAYERS
        assert caches(got)[0]._cache.shape == (1, NUM_HEADS, MAX_TOKENS, EMBED_DIM // NUM_HEADS)
        assert caches(got)[0]._cache.dtype == torch.float32
        assert got._keys_values[1]._v_cache.get().shape == (1, NUM_HEADS, 6, 96)
    assert m.init_pools[0].entry_spec.nbytes == 98_304  # 96 KiB, as the reference computes
    # get(out=...) copies into a caller's entry of either kind and sets its sizes.
    out = kind(1, NUM_HEADS, MAX_TOKENS, EMBED_DIM, NUM_LAYERS)
    assert m.get_init_cache(0, 1, out=out) is out
    assert_same_data(out, snap)
    m.check()



@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_isolation_between_envs(kind: Callable[..., Any]) -> None:
    """The same latent key in different envs maps to each env's own entry."""
    m = real_manager(env_num=3)
    key = hash_state(_latent(1, dim=768))
    snaps = {}
    for e in range(2):
        src = real_entry(kind, seed=100 + e)
        snaps[e] = data_of(src)
        m.set_init_cache(e, key, src)
    for e in range(2):
        assert_same_data(m.get_init_cache(e, key), snaps[e])
        assert_same_data(m.hierarchical_get(e, key), snaps[e])
    assert m.get_init_cache(2, key) is None and m.hierarchical_get(2, key) is None
    m.check()



@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_init_to_recur_fallback(kind: Callable[..., Any]) -> None:
    """hierarchical_get falls back to the recur pool when the env's init pool misses."""
    m = real_manager()
    root_key, child_key = hash_state(_latent(1, dim=768)), hash_state(_latent(2, dim=768))
    root, child = real_entry(kind, 1, size=4), real_entry(kind, 2, size=6)
    m.set_init_cache(1, root_key, root)
    m.set_recur_cache(child_key, child)
    assert_same_data(m.hierarchical_get(1, root_key), data_of(root))
    assert_same_data(m.hierarchical_get(1, child_key), data_of(child))
    assert_same_data(m.hierarchical_get(0, child_key), data_of(child))  # recur is shared
    assert m.hierarchical_get(0, root_key) is None
    assert m.init_pools[1].stats_snapshot().hits == 1
    assert m.recur_pool.stats_snapshot().hits == 2
    m.check()



@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_eviction(kind: Callable[..., Any]) -> None:
    """Writing past the recur pool's size evicts oldest entries; survivors keep exact data."""
    m = real_manager(env_num=1, recur_pool_size=3)
    keys = [hash_state(_latent(s, dim=768)) for s in range(6)]
    snaps = {}
    for s, k in enumerate(keys):
        src = real_entry(kind, seed=s, size=s % 7)
        snaps[k] = data_of(src)
        m.set_recur_cache(k, src)
    for k in keys[:3]:
        assert m.get_recur_cache(k) is None
    for k in keys[3:]:
        assert_same_data(m.get_recur_cache(k), snaps[k])
    assert m.recur_pool.stats_snapshot().evictions == 3
    m.check()



@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_stats_tracking(kind: Callable[..., Any]) -> None:
    """Hits, misses, inserts, updates and evictions track real-entry traffic."""
    m = real_manager(env_num=1, init_pool_size=2)
    k1, k2, k3 = (hash_state(_latent(s, dim=768)) for s in (1, 2, 3))
    m.set_init_cache(0, k1, real_entry(kind, 1))
    m.set_init_cache(0, k2, real_entry(kind, 2))
    m.set_init_cache(0, k2, real_entry(kind, 22))
    m.get_init_cache(0, k1)
    m.get_init_cache(0, k3)
    m.set_init_cache(0, k3, real_entry(kind, 3))
    m.hierarchical_get(0, k1)  # evicted: init miss, recur miss
    s = m.get_stats_summary()
    env0 = s["init_pools"]["env_0"]
    assert (env0["hits"], env0["misses"], env0["inserts"], env0["updates"], env0["evictions"]) == (1, 2, 3, 1, 1)
    assert env0["hit_rate"] == pytest.approx(1 / 3)
    assert s["recur_pool"]["misses"] == 1
    assert s["total"]["total_queries"] == 4
    m.check()



@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_real_kv_clearing(kind: Callable[..., Any]) -> None:
    """Clearing real entries empties pools; re-set entries read back exactly."""
    m = real_manager(env_num=2)
    key = hash_state(_latent(5, dim=768))
    src = real_entry(kind, 5)
    m.set_init_cache(0, key, src)
    m.set_init_cache(1, key, src)
    m.set_recur_cache(key, src)
    m.clear_init_caches(0)
    assert m.get_init_cache(0, key) is None
    assert_same_data(m.hierarchical_get(0, key), data_of(src))  # recur still has it
    m.clear_recur_cache()
    assert m.hierarchical_get(0, key) is None
    assert_same_data(m.get_init_cache(1, key), data_of(src))
    m.clear_all()
    assert all(len(p) == 0 for p in m.pools())
    other = real_entry(kind, 6, size=2)
    m.set_init_cache(0, key, other)
    assert_same_data(m.get_init_cache(0, key), data_of(other))
    m.check()



# ---------------------------------------------------------------------------------------------
# Scenario and workflows: UniZero-shaped use of the manager (3)
# ---------------------------------------------------------------------------------------------


def test_scenario_realistic_workflow() -> None:
    """Roots per env, MCTS writes to recur and reads parents via hierarchical_get, recur cleared per search."""
    env_num, num_sim = 2, 5
    m = KVCacheManager({"num_simulations": num_sim, "init_pool_size": 8}, env_num=env_num)
    assert m.recur_pool.capacity == num_sim * env_num
    value: Dict[int, int] = {}  # key -> the value its entry encodes
    counter = iter(range(1, 10_000))
    reads = hits = 0

    for step in range(3):
        roots = {}
        for e in range(env_num):
            key = hash_state(_latent(1000 * step + e))
            value[key] = next(counter)
            m.set_init_cache(e, key, entry(value[key]))
            roots[e] = key
        m.clear_recur_cache()  # once per search, after the root writes
        nodes = {e: [roots[e]] for e in range(env_num)}
        for sim in range(num_sim):
            for e in range(env_num):  # reads for the whole batch ...
                parent = nodes[e][-1]
                got = m.hierarchical_get(e, parent)
                reads += 1
                hits += got is not None
                assert_entry(got, value[parent])
            for e in range(env_num):  # ... then writes
                child = hash_state(_latent(10**6 + 1000 * step + 10 * sim + e))
                value[child] = next(counter)
                m.set_recur_cache(child, entry(value[child]))
                nodes[e].append(child)
        assert len(m.recur_pool) == num_sim * env_num
        # Roots of earlier steps are still in their env's init pool.
        for e in range(env_num):
            assert_entry(m.get_init_cache(e, roots[e]), value[roots[e]])
    assert hits == reads == 3 * num_sim * env_num
    assert m.recur_pool.stats_snapshot().evictions == 0
    # Episode end of env 0.
    m.clear_init_caches(0)
    assert len(m.init_pools[0]) == 0 and len(m.init_pools[1]) == 3
    m.check()



def test_workflow_imagine_rollout() -> None:
    """An imagine-style rollout: read the previous state's cache, append tokens, store the new state."""
    m = real_manager(env_num=1, init_pool_size=2, recur_pool_size=8)
    head_dim = EMBED_DIM // NUM_HEADS
    root_key = hash_state(_latent(0, dim=768))
    m.set_init_cache(0, root_key, KeysValues(1, NUM_HEADS, MAX_TOKENS, EMBED_DIM, NUM_LAYERS))
    keys = [root_key]
    for t in range(1, 4):
        kv = m.hierarchical_get(0, keys[-1])
        assert kv is not None and kv.size == 2 * (t - 1)
        for layer_i, layer in enumerate(kv._keys_values):  # two tokens (action, obs) per step
            k = torch.full((1, NUM_HEADS, 2, head_dim), float(10 * t + layer_i))
            layer.update(k, -k)
        key = hash_state(_latent(t, dim=768))
        m.set_recur_cache(key, kv)
        keys.append(key)
        kv._keys_values[0]._k_cache._cache.zero_()  # the caller's copy is scratch
    # Every step's entry holds exactly the tokens of the steps so far.
    for t, key in enumerate(keys):
        kv = m.hierarchical_get(0, key)
        assert kv.size == 2 * t
        for layer_i, layer in enumerate(kv._keys_values):
            k, v = layer.get()
            assert k.shape == (1, NUM_HEADS, 2 * t, head_dim)
            for s in range(1, t + 1):
                want = float(10 * s + layer_i)
                assert torch.equal(k[:, :, 2 * (s - 1) : 2 * s], torch.full_like(k[:, :, :2], want))
                assert torch.equal(v[:, :, 2 * (s - 1) : 2 * s], torch.full_like(v[:, :, :2], -want))
    assert m.recur_pool.stats_snapshot().evictions == 0
    m.check()



def test_workflow_mcts_search_every_parent_read_hits() -> None:
    """An MCTS search: expand a tree per env; every parent lookup hits with the parent's data."""
    env_num, num_sim = 2, 12
    m = KVCacheManager({"num_simulations": num_sim, "init_pool_size": 4}, env_num=env_num)
    rng = random.Random(0)
    value: Dict[int, int] = {}
    serial = iter(range(1, 10_000))
    for search in range(2):
        m.clear_recur_cache()
        tree: Dict[int, List[int]] = {}
        for e in range(env_num):
            root = hash_state(_latent(500 + 10 * search + e))
            value[root] = next(serial)
            m.set_init_cache(e, root, entry(value[root], size=0))
            tree[e] = [root]
        before = m.get_stats_summary()["total"]
        for sim in range(num_sim):
            parents = {e: rng.choice(tree[e]) for e in range(env_num)}
            for e, parent in parents.items():
                got = m.hierarchical_get(e, parent)
                assert_entry(got, value[parent], size=0)
            for e, parent in parents.items():
                child = hash_state(_latent(10**5 + 1000 * search + 10 * sim + e))
                value[child] = next(serial)
                m.set_recur_cache(child, entry(value[child], size=0))
                tree[e].append(child)
        after = m.get_stats_summary()["total"]
        # Every read hit (either the root in init or a node in recur); recur never evicted.
        assert after["hits"] - before["hits"] == num_sim * env_num
        assert m.recur_pool.stats_snapshot().evictions == 0
        assert len(m.recur_pool) == num_sim * env_num
        for e in range(env_num):  # the whole tree is still readable
            for node in tree[e]:
                assert_entry(m.hierarchical_get(e, node), value[node], size=0)
    m.check()
