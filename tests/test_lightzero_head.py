"""concurrent_kv/integrations/lightzero_head.py and the main-branch compatibility surface of the core.

LightZero itself is not needed here: a stand-in package with the main branch's manager signature
takes its place. The tier against the real main branch is tests/lightzero_head/ (./dev lightzero-head).
"""

from __future__ import annotations

import logging
import sys
import threading
import types
from typing import Any, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concurrent_kv import ConcurrentKVError, ConfigError, EntrySpec, EnvIdError, KVCacheManager, KVCachePool, ManagerConfig
from concurrent_kv.integrations.lightzero import IntegrationError
from concurrent_kv.integrations.lightzero_head import (
    CONSTRUCTOR,
    MAIN_BRANCH_SURFACE,
    MANAGER_METHODS,
    AttachedKVCacheManager,
    Replacement,
    attached_manager_class,
    check_main_branch_manager,
    use_for_main_branch,
)

from .helpers import SMALL, is_entry_of, keyed_entry
from .validation_helpers import assert_raises

#: A world-model config whose entries are helpers.SMALL (2 layers, 2 heads, 4 tokens, head_dim 8).
CONFIG = {"num_layers": 2, "num_heads": 2, "embed_dim": 16, "context_length": 4, "num_simulations": 2}


# -- the core, called as LightZero main calls it --------------------------------------------------


def test_constructor_takes_the_main_branch_arguments_positionally_and_by_name() -> None:
    a = KVCacheManager(CONFIG, 2, True, 7, 3)
    b = KVCacheManager(config=CONFIG, env_num=2, enable_stats=True, clear_recur_log_freq=7, clear_all_log_freq=3)
    for m in (a, b):
        assert (m.clear_recur_log_freq, m.clear_all_log_freq) == (7, 3)
        assert m.init_pools[0].capacity == 256 and m.recur_pool.capacity == 4 and m.wm_pool.capacity == 2


@pytest.mark.parametrize("name", ["clear_recur_log_freq", "clear_all_log_freq"])
@pytest.mark.parametrize("bad", [-1, True, 1.5, "10", None])
def test_log_frequencies_are_validated(name: str, bad: Any) -> None:
    assert_raises(ConfigError, ValueError, lambda: KVCacheManager(CONFIG, 1, **{name: bad}))


def test_clears_are_counted_and_logged_every_nth_call(caplog: pytest.LogCaptureFixture) -> None:
    m = KVCacheManager(CONFIG, 1, clear_recur_log_freq=2, clear_all_log_freq=0)
    with caplog.at_level(logging.INFO, logger="concurrent_kv.manager"):
        for _ in range(5):
            m.clear_recur_cache()
            m.clear_all()
    assert (m._clear_recur_counter, m._clear_all_counter) == (5, 5)
    recur = [r for r in caplog.records if "recurrent" in r.getMessage()]
    assert [r.getMessage().endswith(f"total calls: {n})") for r, n in zip(recur, (2, 4))] == [True, True]
    assert len(recur) == 2 and not [r for r in caplog.records if "all KV caches" in r.getMessage()]


def test_a_bad_env_id_is_also_a_value_error_as_in_the_main_branch() -> None:
    m = KVCacheManager(CONFIG, 2)
    with pytest.raises(ValueError):
        m.get_init_cache(2, 1)
    assert issubclass(EnvIdError, IndexError)


def test_ours_has_every_name_the_main_branch_uses() -> None:
    m = KVCacheManager(CONFIG, 2)
    for name in MAIN_BRANCH_SURFACE["manager"] + MANAGER_METHODS:
        assert hasattr(m, name), name
    for pool in m.pools():
        for name in MAIN_BRANCH_SURFACE["pool"] + ("enable_stats", "pool_size", "stats", "eviction_strategy", "name"):
            assert hasattr(pool, name), name
    assert m.get_stats_summary()["stats_enabled"] is True


# -- KVCachePool.key_index / _key_to_index ---------------------------------------------------------


def test_key_index_is_a_read_only_snapshot_of_set_results() -> None:
    pool = KVCachePool(4, entry_spec=SMALL)
    assert dict(pool._key_to_index) == {}
    slots = {k: pool.set(k, keyed_entry(k)) for k in (10, 11, 12)}
    view = pool._key_to_index
    assert dict(view) == slots and set(view.keys()) == {10, 11, 12}
    pool.set(13, keyed_entry(13))
    pool.clear()
    assert dict(view) == slots  # a snapshot: later changes do not show
    with pytest.raises(TypeError):
        view[99] = 0  # type: ignore[index]
    assert dict(pool.key_index()) == {}
    assert pool.enable_stats is True and KVCachePool(2, enable_stats=False).enable_stats is False


def test_key_index_of_an_unsized_pool_and_a_shared_pool() -> None:
    assert dict(KVCachePool(max_bytes=1 << 20).key_index()) == {}
    with KVCachePool(3, entry_spec=SMALL, shared=True) as pool:
        slot = pool.set(5, keyed_entry(5))
        assert dict(pool._key_to_index) == {5: slot}


def test_key_index_stays_consistent_while_threads_write() -> None:
    """LightZero's use, ``token_contexts.keys() - pool._key_to_index.keys()``, from one thread while
    others write, evict and clear: every snapshot is a proper key -> slot map of the pool."""
    pool = KVCachePool(8, entry_spec=SMALL)
    stop = threading.Event()
    errors = []

    def writer(seed: int) -> None:
        try:
            for i in range(400):
                key = (seed * 1000 + i) % 40
                pool.set(key, keyed_entry(key))
                if i % 97 == 0:
                    pool.clear()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    snapshots = 0

    def reader() -> None:
        nonlocal snapshots
        contexts = {k: None for k in range(40)}
        out = SMALL.empty_entry()
        try:
            while not stop.is_set():
                view = pool._key_to_index
                stale = contexts.keys() - view.keys()
                assert len(view) <= 8 and len(set(view.values())) == len(view)
                assert set(view) <= set(range(40)) and stale == set(range(40)) - set(view)
                for key in list(view)[:2]:  # what the view listed was stored under that key
                    got = pool.get(key, out=out)
                    assert got is None or is_entry_of(got, key)
                snapshots += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert errors == [] and snapshots > 0
    pool.check()


# -- ManagerConfig.device --------------------------------------------------------------------------


def test_config_device_places_preallocated_slots() -> None:
    m = KVCacheManager({**CONFIG, "device": "cpu"}, 1)
    assert m.init_pools[0].entry_spec.device == torch.device("cpu")
    assert ManagerConfig(device=torch.device("cpu")).device == torch.device("cpu")


@pytest.mark.parametrize("bad", [True, 1.5, "no-such-device", object()])
def test_config_device_is_validated(bad: Any) -> None:
    assert_raises(ConfigError, ValueError, lambda: ManagerConfig(device=bad))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_config_device_cuda_puts_slots_on_the_gpu() -> None:
    """A CUDA world model's config (device="cuda") gives pools on the GPU, which take its entries."""
    m = KVCacheManager({**CONFIG, "device": "cuda"}, 1)
    assert m.init_pools[0].entry_spec.device.type == "cuda"
    m.set_init_cache(0, 3, keyed_entry(3, EntrySpec(2, 1, 2, 4, 8, device="cuda")))
    got = m.get_init_cache(0, 3)
    assert got._keys_values[0]._k_cache._cache.is_cuda and is_entry_of(got, 3)


# -- use_for_main_branch, on a stand-in for LightZero ----------------------------------------------


class MainBranchManager:
    """The main branch's manager, as far as use_for_main_branch can see: signature and methods."""

    def __init__(self, config: Any, env_num: int, enable_stats: bool = True, clear_recur_log_freq: int = 1000,
                 clear_all_log_freq: int = 100) -> None:
        self.env_num = env_num


for _name in MANAGER_METHODS:
    setattr(MainBranchManager, _name, lambda self, *a: None)


@pytest.fixture
def fake_lightzero() -> Iterator[types.ModuleType]:
    """``fakelz.kvm`` defines the manager; ``fakelz.wm`` imported its name, ``fakelz.other`` did not."""
    pkg = types.ModuleType("fakelz")
    kvm = types.ModuleType("fakelz.kvm")
    wm = types.ModuleType("fakelz.wm")
    other = types.ModuleType("fakelz.other")
    kvm.KVCacheManager = MainBranchManager
    wm.KVCacheManager = MainBranchManager
    other.KVCacheManager = object
    mods = {"fakelz": pkg, "fakelz.kvm": kvm, "fakelz.wm": wm, "fakelz.other": other}
    sys.modules.update(mods)
    try:
        yield kvm
    finally:
        for name in mods:
            sys.modules.pop(name, None)


def test_replaces_the_class_where_it_stands_and_where_it_was_imported(fake_lightzero: types.ModuleType) -> None:
    r = use_for_main_branch(module="fakelz.kvm")
    assert isinstance(r, Replacement)
    assert r.original is MainBranchManager and r.replacement is KVCacheManager and r.handle is None
    assert r.modules == ("fakelz.kvm", "fakelz.wm")
    assert sys.modules["fakelz.wm"].KVCacheManager is KVCacheManager
    assert sys.modules["fakelz.other"].KVCacheManager is object
    assert "MainBranchManager -> KVCacheManager in fakelz.kvm, fakelz.wm" in str(r)
    again = use_for_main_branch(module=fake_lightzero)  # a second call still knows the original
    assert again.original is MainBranchManager
    r.undo()
    assert fake_lightzero.KVCacheManager is MainBranchManager and sys.modules["fakelz.wm"].KVCacheManager is MainBranchManager


def test_a_module_object_outside_sys_modules_is_replaced_too() -> None:
    mod = types.ModuleType("loose_kvm")
    mod.KVCacheManager = MainBranchManager
    with use_for_main_branch(module=mod) as r:
        assert r.modules == ("loose_kvm",) and mod.KVCacheManager is KVCacheManager
    assert mod.KVCacheManager is MainBranchManager


def test_an_unknown_manager_is_refused_and_nothing_replaced(fake_lightzero: types.ModuleType) -> None:
    class Newer(MainBranchManager):
        def __init__(self, config: Any, env_num: int, enable_stats: bool = True, clear_recur_log_freq: int = 1000,
                     clear_all_log_freq: int = 100, device: str = "cpu") -> None:
            pass

    class Older:
        def __init__(self, config: Any, env_num: int, enable_stats: bool = True) -> None:
            pass

    for cls, words in ((Newer, "device"), (Older, "lacks get_init_cache")):
        fake_lightzero.KVCacheManager = cls
        with pytest.raises(IntegrationError, match=words):
            use_for_main_branch(module="fakelz.kvm")
        assert fake_lightzero.KVCacheManager is cls
    assert sys.modules["fakelz.wm"].KVCacheManager is MainBranchManager
    with pytest.raises(IntegrationError, match="expected LightZero's KVCacheManager class"):
        check_main_branch_manager(MainBranchManager({}, 1))


def test_a_module_without_a_manager_or_not_importable_is_refused(fake_lightzero: types.ModuleType) -> None:
    with pytest.raises(IntegrationError, match="defines no KVCacheManager"):
        use_for_main_branch(module="fakelz")
    with pytest.raises(IntegrationError, match="cannot import no_such_lightzero.kvm"):
        use_for_main_branch(module="no_such_lightzero.kvm")


@pytest.mark.parametrize("kwargs", [
    {"handle": "not a handle"},
    {"env_offset": -1},
    {"env_offset": True},
    {"env_offset": 2},  # without a handle
    {"module": 5},
    {"module": ""},
])
def test_use_for_main_branch_validates_its_arguments(fake_lightzero: types.ModuleType, kwargs: Any) -> None:
    kwargs = {"module": "fakelz.kvm", **kwargs}
    assert_raises(ConfigError, ValueError, lambda: use_for_main_branch(**kwargs))
    assert fake_lightzero.KVCacheManager is MainBranchManager


# -- a handle: the world model in a worker attaches ----------------------------------------------


@pytest.fixture
def shared_manager() -> Iterator[KVCacheManager]:
    with KVCacheManager({**CONFIG, "recur_pool_size": 1, "wm_pool_size": 1}, env_num=4, shared=True) as m:
        yield m


def test_with_a_handle_the_world_model_attaches_to_the_shared_init_pools(
        fake_lightzero: types.ModuleType, shared_manager: KVCacheManager) -> None:
    r = use_for_main_branch(shared_manager.handle(), env_offset=2, module="fakelz.kvm")
    try:
        cls = fake_lightzero.KVCacheManager
        assert issubclass(cls, AttachedKVCacheManager) and r.replacement is cls and r.env_offset == 2
        assert "attaching to a shared manager from env 2" in str(r)
        # As world_model.py builds it, with its own world-model config:
        m = cls(config={**CONFIG, "num_simulations": 3}, env_num=2, enable_stats=True, clear_recur_log_freq=1000,
                clear_all_log_freq=100)
    finally:
        r.undo()
    with m:
        assert m.env_num == 2 and all(p.shared for p in m.pools())
        assert m.recur_pool is m.collector_view.recur_pool  # the shared recur pool, as one collector of it
        m.set_init_cache(1, 77, keyed_entry(77))
        m.set_recur_cache(78, keyed_entry(78))
        assert is_entry_of(shared_manager.get_init_cache(3, 77), 77)  # env 1 here is env 3 there
        assert is_entry_of(shared_manager.get_recur_cache(78), 78)  # held in the shared recur pool
        assert m.collector_view.stored_keys(m.recur_pool) == {78}
        m.clear_recur_cache()  # a new search: releases this collector's entries only
        assert shared_manager.get_recur_cache(78) is None and is_entry_of(m.get_init_cache(1, 77), 77)
        m.clear_all()
        assert shared_manager.get_init_cache(3, 77) is None
        assert m.handle() == shared_manager.handle()  # the whole shared manager, for other workers


def test_an_attached_world_model_must_fit_the_shared_manager(shared_manager: KVCacheManager) -> None:
    cls = attached_manager_class(shared_manager.handle(), env_offset=3)
    assert_raises(ConfigError, ValueError, lambda: cls(CONFIG, 2))  # envs 3 and 4: there is no 4
    cls = attached_manager_class(shared_manager.handle())
    with pytest.raises(ConfigError, match="entries"):
        cls({**CONFIG, "context_length": 8}, 1)
    for bad in ({"env_num": 0}, {"enable_stats": 1}, {"clear_all_log_freq": -1}):
        assert_raises(ConfigError, ValueError, lambda: cls(**{"config": CONFIG, "env_num": 1, **bad}))
    with cls(None, 4) as m:  # a config without the entry shape: the shared pools' shape is used
        assert m.env_num == 4


def test_attached_manager_class_validates(shared_manager: KVCacheManager) -> None:
    assert_raises(ConfigError, ValueError, lambda: attached_manager_class("handle"))  # type: ignore[arg-type]
    assert_raises(ConfigError, ValueError, lambda: attached_manager_class(shared_manager.handle(), 4))
    assert_raises(ConfigError, ValueError, lambda: attached_manager_class(shared_manager.handle(), -1))
    with pytest.raises(IntegrationError, match="needs a handle"):
        AttachedKVCacheManager(CONFIG, 1)
    assert tuple(CONSTRUCTOR) == ("config", "env_num", "enable_stats", "clear_recur_log_freq", "clear_all_log_freq")


junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=True), st.text(max_size=6),
                 st.sampled_from([".", "..x", "a..b", "os", "fakelz", "fakelz.kvm", "\x00"]),
                 st.just(object()), st.just(types.ModuleType("empty")), st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(handle=junk, env_offset=junk, module=junk)
def test_hostile_arguments_raise_only_our_errors(fake_lightzero: types.ModuleType, handle: Any, env_offset: Any,
                                                  module: Any) -> None:
    try:
        r = use_for_main_branch(handle, env_offset=env_offset, module=module)
    except ConcurrentKVError:
        assert fake_lightzero.KVCacheManager is MainBranchManager
        return
    r.undo()  # only the stand-in module with a good call gets here
    assert fake_lightzero.KVCacheManager is MainBranchManager


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=junk, env_num=junk, enable_stats=junk, freq=junk)
def test_hostile_arguments_to_an_attached_manager(shared_manager: KVCacheManager, config: Any, env_num: Any,
                                                   enable_stats: Any, freq: Any) -> None:
    cls = attached_manager_class(shared_manager.handle())
    try:
        m = cls(config, env_num, enable_stats, freq, 100)
    except ConcurrentKVError:
        return
    m.close()
    with pytest.raises(ConcurrentKVError):
        check_main_branch_manager(int)
