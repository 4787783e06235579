"""The adapter against LightZero 0.2.0's real UniZero world model (its own tier: ./dev lightzero).

Each test runs the same seeded MCTS-shaped sequence on two models with identical weights, one
with LightZero's own caches and one through concurrent_kv, and compares every output bit for bit
and the world model's own hit counters.
"""

from __future__ import annotations

import threading

import pytest
import torch

from concurrent_kv import KVCacheManager
from concurrent_kv.integrations.lightzero import (
    IntegrationError,
    ValidationMismatchError,
    attach,
)

from .unizero_small import ENV_NUM, NUM_SIM, build_model, run_steps, same_outputs, twin

STEPS = 6


@pytest.fixture(scope="module")
def base_model():
    return build_model(seed=0)


@pytest.fixture(scope="module")
def reference(base_model):
    """The original caches' run: what every adapted run must reproduce."""
    result = run_steps(twin(base_model), STEPS)
    assert result["recur_hits"] == result["recur_queries"] > 0  # every parent was cached
    assert result["root_hits"] > 0
    return result


def counters(result):
    return tuple(result[k] for k in ("recur_hits", "recur_queries", "root_hits", "root_queries"))


@pytest.mark.parametrize("mode", ["new", "switch_over"])
def test_outputs_and_hit_counts_identical_through_our_pools(base_model, reference, mode: str) -> None:
    model = twin(base_model)
    adapter = attach(model.world_model, mode=mode)
    result = run_steps(model, STEPS)
    assert same_outputs(result, reference)
    assert counters(result) == counters(reference)
    m = adapter.manager
    init_hits = sum(p.stats_snapshot().hits for p in m.init_pools)
    recur = m.recur_pool.stats_snapshot()
    # Every root lookup and every recurrent lookup hit one of our pools.
    assert init_hits + recur.hits == reference["root_hits"] + reference["recur_hits"]
    assert recur.inserts == STEPS * NUM_SIM * ENV_NUM
    m.check()
    if mode == "switch_over":
        assert not hasattr(model.world_model.shared_pool_recur_infer, "append")  # legacy list released
        with pytest.raises(IntegrationError):
            adapter.set_mode("original")


def test_validation_mode_compares_every_lookup(base_model, reference) -> None:
    model = twin(base_model)
    adapter = attach(model.world_model, mode="validate")
    result = run_steps(model, STEPS)
    assert same_outputs(result, reference)  # the original caches still drive the model
    v = adapter.validation
    assert v.mismatches == 0
    assert v.lookups >= reference["root_queries"] + reference["recur_queries"]
    assert v.compared == reference["root_hits"] + reference["recur_hits"]
    assert adapter.stats_summary()["validation"]["mismatches"] == 0


def _corrupt_every_recur_write(adapter) -> None:
    """Make our recur pool store a wrong copy: each stored slot gets +1 after the write."""
    pool = adapter.manager.recur_pool
    original_set = pool.set

    def corrupting_set(key, kv, priority=None, **kwargs):
        slot = original_set(key, kv, priority, **kwargs)
        pool._storage.block[slot].add_(1.0)
        return slot

    pool.set = corrupting_set


def test_validation_catches_a_corrupted_entry(base_model) -> None:
    model = twin(base_model)
    adapter = attach(model.world_model, mode="validate", on_mismatch="raise")
    _corrupt_every_recur_write(adapter)
    with pytest.raises(ValidationMismatchError, match="differ"):
        run_steps(model, 2)
    logged = twin(base_model)
    adapter = attach(logged.world_model, mode="validate", on_mismatch="log")
    _corrupt_every_recur_write(adapter)
    run_steps(logged, 2)
    assert adapter.validation.data_mismatches > 0 and "differ" in adapter.validation.examples[0]


def test_config_flag_selects_ours_and_switching_back_restores_the_original(base_model, reference) -> None:
    model = twin(base_model)
    wm = model.world_model
    originals = (wm.past_kv_cache_recurrent_infer, wm.shared_pool_recur_infer, wm.past_kv_cache_init_infer_envs)
    wm.config.use_new_cache_manager = True
    adapter = attach(wm)
    assert adapter.mode == "new"
    assert wm.past_kv_cache_recurrent_infer is not originals[0]
    adapter.set_mode("original")
    assert (wm.past_kv_cache_recurrent_infer, wm.shared_pool_recur_infer, wm.past_kv_cache_init_infer_envs) == originals
    assert "custom_copy_kv_cache_to_shared_recur" not in wm.__dict__  # the class's method again
    assert wm.config.use_new_cache_manager is False
    assert same_outputs(run_steps(model, STEPS), reference)
    wm.config.use_new_cache_manager = False
    assert attach(twin(base_model).world_model).mode == "original"  # LightZero's default


def test_shared_manager_gives_the_same_outputs(base_model, reference) -> None:
    model = twin(base_model)
    adapter = attach(model.world_model, mode="new", shared=True)
    try:
        assert adapter.manager.shared
        result = run_steps(model, STEPS)
        assert same_outputs(result, reference) and counters(result) == counters(reference)
        adapter.manager.check()
    finally:
        adapter.manager.close()


def test_collector_then_evaluator_threads_keep_env_isolation(base_model) -> None:
    """safe_eval: the collector's thread, then the evaluator's, drive one world model's cache."""
    sequential = twin(base_model)
    expected = [run_steps(sequential, 3, seed=1), run_steps(sequential, 3, seed=2)]
    model = twin(base_model)
    adapter = attach(model.world_model, mode="new")
    results = []
    for seed in (1, 2):
        t = threading.Thread(target=lambda s=seed: results.append(run_steps(model, 3, seed=s)))
        t.start()
        t.join(120)
    assert len(results) == 2
    assert same_outputs(results[0], expected[0]) and same_outputs(results[1], expected[1])
    for env, pool in enumerate(adapter.manager.init_pools):
        # Root entries of env k live only in init pool k.
        assert len(pool) > 0
        assert all(key not in other for key in pool.keys() for j, other in enumerate(adapter.manager.init_pools) if j != env)


def test_attach_refuses_what_it_cannot_adapt(base_model) -> None:
    with pytest.raises(IntegrationError, match="0.2.0"):
        attach(object())
    with pytest.raises(Exception):
        attach(twin(base_model).world_model, mode="turbo")
    small = KVCacheManager({"num_simulations": 1}, 1)
    with pytest.raises(Exception):
        attach(twin(base_model).world_model, manager=small)


def test_numpy_is_the_1x_line_here() -> None:
    """This tier runs with numpy<2 (LightZero's pin): the library must work on both."""
    import numpy

    assert numpy.__version__.startswith("1.")


def test_a_full_recur_pool_is_a_miss_that_recomputes_never_a_crash(base_model) -> None:
    """A recur pool half the size one search needs, every entry held by the search: the stores
    that find no slot are refused, their lookups miss, and LightZero 0.2.0 recomputes them on its
    generate path (with its own caches the same miss indexes its slot list with None)."""
    model = twin(base_model)
    wm = model.world_model
    manager = KVCacheManager({"init_pool_size": len(wm.shared_pool_init_infer[0]),
                              "recur_pool_size": NUM_SIM * ENV_NUM // 2, "wm_pool_size": len(wm.shared_pool_wm)},
                             ENV_NUM)
    adapter = attach(wm, manager, mode="new")
    result = run_steps(model, 3)
    assert adapter.collector.rejected > 0
    assert adapter.stats_summary()["collector"]["rejected"] == adapter.collector.rejected
    assert 0 < result["recur_hits"] < result["recur_queries"]  # the refused entries were recomputed
    assert all(torch.isfinite(t).all() for t in result["outputs"])
    manager.check()
