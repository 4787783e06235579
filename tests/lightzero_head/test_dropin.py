"""concurrent_kv.KVCacheManager in place of LightZero main branch's own (integrations/lightzero_head.py).

Each comparison builds the main-branch model twice with one set of weights: once with LightZero's
own ``KVCacheManager``, once after ``use_for_main_branch()`` put ours in its place. Both run the
same seeded collector/MCTS sequence (head_small.run: window roll-over, mixed first/continuing
batches, a partial batch, and the policy's clears) and must agree bit for bit on every output
tensor, on the world model's counters, on each pool's hits/misses/evictions, and on which keys
each pool holds after every call.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from .source import require_main_branch

require_main_branch()

import concurrent_kv  # noqa: E402
from concurrent_kv.integrations.lightzero import IntegrationError  # noqa: E402
from concurrent_kv.integrations.lightzero_head import Replacement, use_for_main_branch  # noqa: E402
from lzero.model.unizero_world_models import kv_cache_manager as lz_kvm  # noqa: E402
from lzero.model.unizero_world_models.kv_caching import KeysValues as LzKeysValues  # noqa: E402
from lzero.model.unizero_world_models.utils import hash_state  # noqa: E402

from . import head_small as H  # noqa: E402

# name -> (config of both models, extra config read only by ours, what must have happened)
VARIANTS: Dict[str, Any] = {
    # LightZero's sizes (init 256 per env, recur num_simulations * env_num = 15): nothing evicted.
    "fifo": ({}, {}, "no_evictions"),
    # Pools far too small: init 4 per env, recur 3. Both FIFO rings evict mid-search, so some
    # recurrent lookups miss and regenerate; ours must evict the very same keys.
    "fifo-evicting": ({"num_simulations": 1, "max_cache_size": 4}, {}, "evictions"),
    # The same, with the token-window rebuild: the only path where world_model.py reads
    # pool._key_to_index (to drop token contexts of evicted keys).
    "fifo-evicting-token-window": (
        {"num_simulations": 1, "max_cache_size": 4, "rebuild_kv_window_from_tokens": True}, {}, "evictions"),
    "lru": ({}, {"init_eviction_strategy": "lru", "recur_eviction_strategy": "lru"}, "no_evictions"),
    "priority": ({}, {"init_eviction_strategy": "priority", "recur_eviction_strategy": "priority"}, "no_evictions"),
}


@pytest.fixture(scope="module")
def base() -> Any:
    """The weights every model here uses (built with LightZero's own manager)."""
    assert lz_kvm.KVCacheManager.__module__ == lz_kvm.__name__
    return H.build_model(seed=0)


def ours(base: Any, **config: Any) -> Any:
    with use_for_main_branch() as replacement:
        model = H.twin_with_weights(base, **config)
    assert replacement.replacement is concurrent_kv.KVCacheManager
    assert type(model.world_model.kv_cache_manager) is concurrent_kv.KVCacheManager
    return model


def theirs(base: Any, **config: Any) -> Any:
    model = H.twin_with_weights(base, **config)
    assert type(model.world_model.kv_cache_manager) is lz_kvm.KVCacheManager
    return model


def assert_same_run(ref: H.Result, got: H.Result) -> None:
    assert H.mismatches(ref, got) == []
    assert got.counters == ref.counters
    assert got.pool_stats == ref.pool_stats
    assert got.key_sets == ref.key_sets


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_output_bit_identical_to_the_main_branch_manager(base: Any, variant: str) -> None:
    config, our_config, expect = VARIANTS[variant]
    ref = H.run(theirs(base, **config))
    model = ours(base, **config, **our_config)
    got = H.run(model)
    assert_same_run(ref, got)
    H.COMPARED[variant] = (got.count("initial."), got.count("recurrent."), len(H.mismatches(ref, got)))

    m = model.world_model.kv_cache_manager
    evictions = sum(stats[2] for stats in got.pool_stats.values())
    if expect == "evictions":
        assert evictions > 0 and got.pool_stats["recurrent"][1] > 0  # evicted, and lookups missed
    else:
        assert evictions == 0 and got.counters["hit_count"] == got.counters["total_query_count"]
    strategy = our_config.get("recur_eviction_strategy", "fifo")
    assert m.recur_pool.eviction_strategy == strategy and m.init_pools[0].eviction_strategy == strategy
    assert got.counters["root_hit_cnt"] > 0 and got.counters["kv_padding_unequal_batches"] > 0
    if config.get("rebuild_kv_window_from_tokens"):
        wm = model.world_model
        assert got.counters["exact_kv_reset_batches"] > 0
        # Token contexts were kept in step with our pools through their _key_to_index views.
        assert set(wm.past_token_context_recurrent_infer) <= set(m.recur_pool._key_to_index)
        for e, pool in enumerate(m.init_pools):
            assert set(wm.past_token_context_init_infer_envs[e]) <= set(pool._key_to_index)
    m.check()


def test_the_schedule_rolls_windows_over_and_clears(base: Any) -> None:
    """What the comparisons cover: root entries stop growing at context_length - 3 (the window
    rolled over; without it they would reach context_length - 1), and each clear emptied its pools."""
    sizes = []

    def root_sizes(step: int, model: Any, out: Any) -> None:
        pools = model.world_model.kv_cache_manager.init_pools
        sizes.append(sorted({kv.size for p in pools for kv in p._pool if kv is not None}))

    res = H.run(theirs(base), after_step=root_sizes)
    assert sizes[0] == [1] and sizes[1] == [1, 3]
    assert max(max(s) for s in sizes) == H.CONTEXT - 3
    calls_per_step = 1 + H.NUM_SIM
    after = {step: (step + 1) * calls_per_step + sum(1 for s in H.SCHEDULE if s < step and "after" in H.SCHEDULE[s])
             for step in H.SCHEDULE}
    assert res.key_sets[after[3]]["init_env1"] == frozenset()  # the collector's episode end
    assert all(not keys for keys in res.key_sets[after[5]].values())  # clear_caches
    cleared = res.key_sets[after[6]]
    assert cleared["init_env2"] == frozenset() and cleared["recurrent"] == frozenset()  # evaluator's end
    assert cleared["init_env0"]


def test_use_for_main_branch_reports_and_undoes(base: Any) -> None:
    original = lz_kvm.KVCacheManager
    replacement = use_for_main_branch()
    try:
        assert isinstance(replacement, Replacement)
        assert replacement.original is original and replacement.replacement is concurrent_kv.KVCacheManager
        assert lz_kvm.__name__ in replacement.modules
        assert lz_kvm.KVCacheManager is concurrent_kv.KVCacheManager
        again = use_for_main_branch()  # idempotent: the original is still known
        assert again.original is original
        assert "kv_cache_manager" in str(again)
    finally:
        replacement.undo()
    assert lz_kvm.KVCacheManager is original


def test_world_model_namespace_is_replaced_when_it_imported_the_name(base: Any) -> None:
    from lzero.model.unizero_world_models import world_model as lz_wm

    lz_wm.KVCacheManager = lz_kvm.KVCacheManager  # as a module-level import would leave it
    try:
        with use_for_main_branch() as r:
            assert lz_wm.__name__ in r.modules and lz_wm.KVCacheManager is concurrent_kv.KVCacheManager
        assert lz_wm.KVCacheManager is lz_kvm.KVCacheManager
    finally:
        del lz_wm.KVCacheManager


def test_a_manager_it_does_not_know_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Newer(lz_kvm.KVCacheManager):
        def __init__(self, config, env_num, enable_stats=True, clear_recur_log_freq=1000, clear_all_log_freq=100,
                     device=None):
            super().__init__(config, env_num, enable_stats, clear_recur_log_freq, clear_all_log_freq)

    monkeypatch.setattr(lz_kvm, "KVCacheManager", Newer)
    with pytest.raises(IntegrationError, match="device"):
        use_for_main_branch()
    assert lz_kvm.KVCacheManager is Newer  # nothing replaced


def test_stats_summary_has_the_shape_the_world_model_reads(base: Any) -> None:
    theirs_m = theirs(base).world_model.kv_cache_manager
    ours_m = ours(base).world_model.kv_cache_manager
    a, b = theirs_m.get_stats_summary(), ours_m.get_stats_summary()
    assert a["stats_enabled"] is b["stats_enabled"] is True  # the one key world_model.clear_caches reads
    assert set(a) <= set(b) and set(a["init_pools"]) == set(b["init_pools"])
    strings = ours_m.get_stats_summary(as_strings=True)
    assert set(strings) == set(a) and all(isinstance(v, str) for v in strings["init_pools"].values())


# -- reference semantics ----------------------------------------------------------------------


def lz_entry(value: float) -> Any:
    kv = LzKeysValues(1, 2, H.CONTEXT, 32, 2, torch.device("cpu"))
    for layer in kv._keys_values:
        for cache in (layer._k_cache, layer._v_cache):
            cache._cache.fill_(value)
            cache._size = 2
    return kv


def first_value(kv: Any) -> float:
    return float(kv._keys_values[0]._k_cache._cache[0, 0, 0, 0])


@pytest.mark.parametrize("cls", ["theirs", "ours"])
def test_get_results_alias_the_pool_in_the_main_branch_only(cls: str) -> None:
    """The main branch's pool hands out its slot object: a change to what ``get`` returned, or a
    later ``set`` reusing that slot (FIFO eviction), shows through. Ours hands out private copies."""
    manager_cls = lz_kvm.KVCacheManager if cls == "theirs" else concurrent_kv.KVCacheManager
    m = manager_cls(H.world_model_config(num_simulations=1, env_num=2), env_num=2, enable_stats=True,
                    clear_recur_log_freq=1000, clear_all_log_freq=100)  # recur pool: 2 slots
    m.set_init_cache(0, 11, lz_entry(1.0))
    got = m.get_init_cache(0, 11)
    got._keys_values[0]._k_cache._cache.fill_(7.0)  # e.g. a forward pass appending to it
    m.set_recur_cache(21, lz_entry(2.0))
    m.set_recur_cache(22, lz_entry(3.0))
    held = m.get_recur_cache(21)
    m.set_recur_cache(23, lz_entry(4.0))  # FIFO: evicts 21, reusing its slot
    if cls == "theirs":
        assert first_value(m.get_init_cache(0, 11)) == 7.0
        assert first_value(held) == 4.0  # now shows key 23's data
    else:
        assert first_value(m.get_init_cache(0, 11)) == 1.0
        assert first_value(held) == 2.0
    assert m.get_recur_cache(21) is None


def test_world_model_outputs_after_changing_a_get_result_in_place(base: Any) -> None:
    """An analysis hook runs the world model one imagined step over a cached root entry it fetched
    with ``get_init_cache`` (the forward appends two tokens to it, in place). With the main branch's
    manager that changes the stored entry and every later output built on it; with ours the
    later outputs are those of a run without the hook: what a correct cache gives."""

    def hook(step: int, model: Any, out: Any) -> None:
        if step != 2:
            return
        wm = model.world_model
        for e in range(H.ENV_NUM):
            key = hash_state(out.latent_state[e].view(-1).cpu().numpy())
            kv = wm.kv_cache_manager.get_init_cache(e, key)
            assert kv is not None
            with torch.no_grad():  # one imagined step: an action token, then the observation
                wm.forward({"act_tokens": torch.tensor([[1]])}, past_keys_values=kv, is_init_infer=True, start_pos=0)
                wm.forward({"obs_embeddings": out.latent_state[e:e + 1]}, past_keys_values=kv,
                           is_init_infer=True, start_pos=0)

    clean = H.run(theirs(base))
    main_hooked = H.run(theirs(base), after_step=hook)
    ours_hooked = H.run(ours(base), after_step=hook)
    changed = H.mismatches(clean, main_hooked)
    per_step = 3 + 4 * H.NUM_SIM  # output tensors of one initial and NUM_SIM recurrent calls
    assert changed and all(int(i.split(":")[0]) >= 3 * per_step for i in changed)  # from step 3 on
    assert H.mismatches(clean, ours_hooked) == []
    assert ours_hooked.counters == clean.counters
    H.COMPARED["aliasing (ours vs clean run)"] = (ours_hooked.count("initial."), ours_hooked.count("recurrent."), 0)
