"""The starting design's usage example (shared/reference/starting-design.md), run word for word.

The design's other behaviours are tested by module: test_stats.py, test_pool.py, test_leases.py,
test_manager.py, test_config.py and test_keys.py (each section names the design's group).
"""

from __future__ import annotations

import types

import torch

from concurrent_kv import KeysValues


def test_the_starting_designs_usage_example_runs_unchanged() -> None:
    """starting-design.md's example, word for word apart from the import line."""
    from concurrent_kv import KVCacheManager

    config = types.SimpleNamespace(num_simulations=50, game_segment_length=20)
    kv_object = KeysValues(1, 8, 8, 768, 2, "cpu")
    # --- the example ---
    manager = KVCacheManager(config=config, env_num=4, enable_stats=True)
    manager.set_init_cache(env_id=0, cache_key=123, kv_cache=kv_object)
    kv = manager.get_init_cache(env_id=0, cache_key=123)
    stats = manager.get_stats_summary()
    # --- what it promised ---
    assert kv is not None and torch.equal(kv._block, kv_object._block)
    assert stats["stats_enabled"] is True and set(stats) >= {"init_pools", "recur_pool", "wm_pool"}
    assert stats["init_pools"]["env_0"]["hits"] == 1
    legacy_form = manager.get_stats_summary(as_strings=True)
    assert legacy_form["init_pools"]["env_0"].startswith("CacheStats(hits=1, misses=0")
