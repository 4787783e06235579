"""concurrent_kv/integrations/lightzero.py: the adapter's seams on a stand-in world model.

The real world model is tested in tests/lightzero.

The stand-in has LightZero 0.2.0's cache attributes and copy helpers, with the same contract:
dicts key -> slot index, slot lists, helpers that copy into a ring and return the index.
"""

from __future__ import annotations

import pytest
import torch

from concurrent_kv import ConfigError, EntrySpec, KeysValues, KVCacheManager
from concurrent_kv.integrations.lightzero import (
    IntegrationError,
    ValidationMismatchError,
    attach,
)
from concurrent_kv.workload import fill_entry, verify_entry

SPEC = EntrySpec(num_layers=1, num_samples=1, num_heads=2, max_tokens=4, head_dim=4)


class Config:
    num_layers, num_heads, embed_dim, context_length, device = 1, 2, 8, 4, "cpu"
    use_new_cache_manager = False


class StandInWorldModel:
    """Just the cache seams of LightZero 0.2.0's WorldModel, behaving as they do there."""

    def __init__(self, env_num: int = 2, init_size: int = 2, recur_size: int = 4) -> None:
        self.config = Config()
        self.past_kv_cache_init_infer_envs = [{} for _ in range(env_num)]
        self.past_kv_cache_recurrent_infer = {}
        self.shared_pool_init_infer = [[None] * init_size for _ in range(env_num)]
        self.shared_pool_recur_infer = [None] * recur_size
        self.shared_pool_wm = [None] * env_num
        self._ring = {"recur": 0, "wm": 0, **{e: 0 for e in range(env_num)}}
        self.keys_values_wm_list = []

    def _copy(self, slots, ring_key, src):
        i = self._ring[ring_key]
        if slots[i] is None:
            slots[i] = SPEC.empty_entry()
        for d, s in zip(slots[i]._caches(), src._caches()):
            d._cache.copy_(s._cache)
            d._size = s._size
        self._ring[ring_key] = (i + 1) % len(slots)
        return i

    def custom_copy_kv_cache_to_shared_init_envs(self, src_kv, env_id):
        return self._copy(self.shared_pool_init_infer[env_id], env_id, src_kv)

    def custom_copy_kv_cache_to_shared_recur(self, src_kv):
        return self._copy(self.shared_pool_recur_infer, "recur", src_kv)

    def custom_copy_kv_cache_to_shared_wm(self, src_kv):
        i = self._copy(self.shared_pool_wm, "wm", src_kv)
        return self.shared_pool_wm[i]

    def clear_caches(self):
        for d in self.past_kv_cache_init_infer_envs:
            d.clear()
        self.past_kv_cache_recurrent_infer.clear()
        self.keys_values_wm_list.clear()

    # What update_cache_context and the lookups do with the seams:
    def store(self, env, key, kv, init):
        if init:
            index = self.custom_copy_kv_cache_to_shared_init_envs(kv, env)
            self.past_kv_cache_init_infer_envs[env][key] = index
        else:
            index = self.custom_copy_kv_cache_to_shared_recur(kv)
            self.past_kv_cache_recurrent_infer[key] = index

    def lookup(self, env, key):
        index = self.past_kv_cache_init_infer_envs[env].get(key)
        found = self.shared_pool_init_infer[env][index] if index is not None else None
        if found is None:
            index = self.past_kv_cache_recurrent_infer.get(key)
            if index is None:
                return None
            found = self.shared_pool_recur_infer[index]
        return self.custom_copy_kv_cache_to_shared_wm(found)


def hexkey(k: int) -> str:
    return f"{k:016x}"


@pytest.mark.parametrize("mode", ["new", "switch_over", "validate"])
def test_modes_serve_the_same_entries(mode: str) -> None:
    wm = StandInWorldModel()
    adapter = attach(wm, mode=mode)
    for k in range(3):
        wm.store(k % 2, hexkey(k), fill_entry(SPEC.empty_entry(), k), init=True)
        wm.store(0, hexkey(100 + k), fill_entry(SPEC.empty_entry(), 100 + k), init=False)
    for k in range(1, 3):  # init pools hold 2 per env: key 0 (env 0) was overwritten by key 2
        got = wm.lookup(k % 2, hexkey(k))
        assert got is not None and verify_entry(got, k)
    for k in range(3):
        assert verify_entry(wm.lookup(1, hexkey(100 + k)), 100 + k)
    assert wm.lookup(0, hexkey(999)) is None
    if mode == "validate":
        assert adapter.validation.mismatches == 0 and adapter.validation.compared >= 5
    else:
        m = adapter.manager
        assert sorted(m.recur_pool.keys()) == [100, 101, 102]
        assert len(m.init_pools[0]) == 2 and len(m.init_pools[1]) == 1
    wm.clear_caches()
    assert wm.lookup(1, hexkey(100)) is None
    adapter.manager.check()


def test_maps_behave_like_the_dicts_they_replace() -> None:
    wm = StandInWorldModel()
    attach(wm, mode="new")
    recur = wm.past_kv_cache_recurrent_infer
    wm.store(0, hexkey(5), fill_entry(SPEC.empty_entry(), 5), init=False)
    wm.store(0, 6, fill_entry(SPEC.empty_entry(), 6), init=False)  # int keys too (later versions)
    assert hexkey(5) in recur and 6 in recur and len(recur) == 2
    assert sorted(recur) == [5, 6] and sorted(recur.keys()) == [5, 6]
    assert verify_entry(recur[hexkey(5)].entry, 5)
    assert recur.pop(hexkey(5)) == hexkey(5) and recur.pop(hexkey(5), "gone") == "gone"
    del recur[6]
    with pytest.raises(KeyError):
        del recur[6]
    with pytest.raises(KeyError):
        recur[hexkey(6)]
    # LightZero 0.2.0's list raised TypeError when indexed with a miss's None; a miss must make
    # the world model recompute instead (issue 11), so the slot view answers None.
    assert wm.shared_pool_recur_infer[None] is None
    assert len(wm.shared_pool_recur_infer) == 0


def test_a_foreign_entry_is_staged_by_the_wm_helper() -> None:
    wm = StandInWorldModel()
    attach(wm, mode="new")
    src = fill_entry(SPEC.empty_entry(), 9)
    staged = wm.custom_copy_kv_cache_to_shared_wm(src)
    assert staged is not src and verify_entry(staged, 9)
    assert wm.custom_copy_kv_cache_to_shared_wm(staged) is staged  # already private: no copy


def test_validate_mode_compares_with_allclose_and_flags_changes() -> None:
    KEY = 9 << 8 | 1  # its caches hold 4 and 1 valid tokens: validation compares those
    wm = StandInWorldModel()
    adapter = attach(wm, mode="validate", compare="allclose", atol=1e-3, on_mismatch="raise")
    wm.store(0, hexkey(KEY), fill_entry(SPEC.empty_entry(), KEY), init=False)
    adapter.manager.recur_pool._storage.block.add_(1e-4)  # within tolerance
    assert verify_entry(wm.lookup(0, hexkey(KEY)), KEY)
    adapter.manager.recur_pool._storage.block.add_(1.0)  # beyond it
    with pytest.raises(ValidationMismatchError, match="differ"):
        wm.lookup(0, hexkey(KEY))
    adapter.manager.recur_pool.delete(KEY)
    with pytest.raises(ValidationMismatchError, match="original hit, ours miss"):
        wm.lookup(0, hexkey(KEY))
    assert adapter.validation.data_mismatches == 1 and adapter.validation.hit_mismatches == 1
    flat = adapter.flat_stats()
    assert flat["kv_cache/validation/mismatches"] == 2 and "kv_cache/recurrent/hits" in flat
    v = wm.past_kv_cache_recurrent_infer
    assert hexkey(KEY) in v and len(v) == 1 and list(v) == [hexkey(KEY)] and list(v.keys()) == [hexkey(KEY)]
    assert v[hexkey(KEY)] == 0 and v.pop(hexkey(KEY)) == 0


@pytest.mark.parametrize("compare", ["equal", "allclose"])
def test_validate_mode_compares_only_the_tokens_the_model_reads(compare: str) -> None:
    # LightZero allocates slots with torch.empty: past _size they hold anything, NaN included.
    wm = StandInWorldModel()
    adapter = attach(wm, mode="validate", compare=compare, on_mismatch="raise")
    kv = fill_entry(SPEC.empty_entry(), 1)
    for c in kv._caches():
        c._size = 2
        c._cache[..., 0, 0] = float("nan")  # a NaN the model produced: inside the valid tokens
    wm.store(0, hexkey(1), kv, init=False)
    original = wm.shared_pool_recur_infer[wm.past_kv_cache_recurrent_infer[hexkey(1)]]
    for c in original._caches():
        c._cache[..., 2:, :] = float("nan")  # the tail differs from our copy's
    wm.lookup(0, hexkey(1))
    assert adapter.validation.compared == 1 and adapter.validation.mismatches == 0
    original._caches()[1]._cache[..., 1, 0] += 1.0  # a change inside the valid tokens is caught
    with pytest.raises(ValidationMismatchError, match="differ"):
        wm.lookup(0, hexkey(1))


def test_detach_restores_the_world_models_own_caches() -> None:
    wm = StandInWorldModel()
    dicts, slots = wm.past_kv_cache_init_infer_envs, wm.shared_pool_recur_infer
    adapter = attach(wm, mode="new")
    assert "custom_copy_kv_cache_to_shared_recur" in wm.__dict__
    adapter.detach()
    assert wm.past_kv_cache_init_infer_envs is dicts and wm.shared_pool_recur_infer is slots
    assert "custom_copy_kv_cache_to_shared_recur" not in wm.__dict__
    wm.store(0, hexkey(3), fill_entry(SPEC.empty_entry(), 3), init=False)
    assert verify_entry(wm.lookup(0, hexkey(3)), 3)


def test_attach_validates_its_inputs() -> None:
    with pytest.raises(IntegrationError, match="lacks the cache seams"):
        attach(object())
    head = StandInWorldModel()
    head.pool_idx_to_key_map_recur_infer = []
    with pytest.raises(IntegrationError, match="reverse slot maps"):
        attach(head)
    with pytest.raises(ConfigError):
        attach(StandInWorldModel(), mode="turbo")
    with pytest.raises(ConfigError):
        attach(StandInWorldModel(), manager="not a manager")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        attach(StandInWorldModel(env_num=3), manager=KVCacheManager({"num_simulations": 1}, 2))
    with pytest.raises(ConfigError):
        attach(StandInWorldModel(), on_mismatch="shrug")
    with pytest.raises(ConfigError):
        attach(StandInWorldModel(), compare="roughly")
    adapter = attach(StandInWorldModel(), mode="switch_over")
    with pytest.raises(IntegrationError):
        adapter.set_mode("original")
    with pytest.raises(ConfigError):
        adapter.set_mode("turbo")


def test_default_mode_follows_the_config_flag() -> None:
    wm = StandInWorldModel()
    assert attach(wm).mode == "original"
    wm2 = StandInWorldModel()
    wm2.config = Config()
    wm2.config.use_new_cache_manager = True
    adapter = attach(wm2)
    assert adapter.mode == "new" and adapter.stats_summary()["mode"] == "new"
    assert isinstance(adapter.manager.recur_pool.entry_spec, EntrySpec)
    assert torch.equal(KeysValues.from_block(torch.zeros(2, 1, 2, 4, 4), (0, 0))._block, torch.zeros(2, 1, 2, 4, 4))
