"""concurrent_kv/manager.py, validation: bad env ids, bad arguments and use after close are rejected.

A rejected call changes nothing in any pool (``assert_manager_rejected``). Bad config values
are in test_config.py.
"""

from __future__ import annotations

from typing import Any, Callable, Type

import pytest
import torch

from concurrent_kv import KVCacheManager
from concurrent_kv.errors import (
    ClosedError,
    ConfigError,
    EntryMismatchError,
    EnvIdError,
    InvalidEntryError,
    InvalidKeyError,
)

from .validation_helpers import assert_entry, assert_raises, entry


def manager(env_num: int = 2) -> KVCacheManager:
    """A small manager with one entry in each pool (values 1.0 env 0, 2.0 env 1, 5.0 recur, 6.0 wm)."""
    m = KVCacheManager({"num_simulations": 2, "init_pool_size": 3, "wm_pool_size": 2}, env_num=env_num)
    for e in range(env_num):
        m.set_init_cache(e, 10, entry(1.0 + e))
    m.set_recur_cache(20, entry(5.0))
    m.set_wm_cache(30, entry(6.0))
    return m



def assert_manager_rejected(
    m: KVCacheManager, exc: Type[BaseException], builtin: Type[BaseException], fn: Callable[[], Any]
) -> None:
    """``fn()`` is rejected and every pool of ``m`` is unchanged."""
    before = [p.stats_snapshot() for p in m.pools()]
    keys = [sorted(p.keys()) for p in m.pools()]
    assert_raises(exc, builtin, fn)
    assert [p.stats_snapshot() for p in m.pools()] == before
    assert [sorted(p.keys()) for p in m.pools()] == keys
    for e in range(m.env_num):
        assert_entry(m.get_init_cache(e, 10), 1.0 + e)
    assert_entry(m.get_recur_cache(20), 5.0)
    assert_entry(m.get_wm_cache(30), 6.0)
    m.check()



@pytest.mark.parametrize("env_num", [0, -1, True, False, "2", 2.0, None, [2]])
def test_manager_rejects_bad_env_num(env_num: Any) -> None:
    """env_num must be a positive int: ConfigError (a ValueError)."""
    assert_raises(ConfigError, ValueError, lambda: KVCacheManager({}, env_num=env_num))



@pytest.mark.parametrize("enable_stats", [1, "yes", None])
def test_manager_rejects_non_bool_enable_stats(enable_stats: Any) -> None:
    assert_raises(ConfigError, ValueError, lambda: KVCacheManager({}, env_num=1, enable_stats=enable_stats))



BAD_ENV_IDS = [
    pytest.param(-1, id="-1"),
    pytest.param(2, id="env_num"),
    pytest.param(100, id="100"),
    pytest.param(True, id="True"),
    pytest.param(False, id="False"),
    pytest.param("0", id="str"),
    pytest.param(0.0, id="float"),
    pytest.param([0], id="list"),
]


ENV_CALLS = [
    pytest.param(lambda m, e: m.get_init_cache(e, 10), id="get_init_cache"),
    pytest.param(lambda m, e: m.set_init_cache(e, 11, entry(9.0)), id="set_init_cache"),
    pytest.param(lambda m, e: m.hierarchical_get(e, 20), id="hierarchical_get"),
    pytest.param(lambda m, e: m.clear_init_caches(e), id="clear_init_caches"),
]



@pytest.mark.parametrize("call", ENV_CALLS)
@pytest.mark.parametrize("env_id", BAD_ENV_IDS)
def test_manager_rejects_bad_env_id(call: Callable[[KVCacheManager, Any], Any], env_id: Any) -> None:
    """An env_id outside [0, env_num) or not an int raises EnvIdError (an IndexError), touching no pool
    (hierarchical_get does not fall through to the recur pool)."""
    m = manager(env_num=2)
    assert_manager_rejected(m, EnvIdError, IndexError, lambda: call(m, env_id))



def test_get_init_cache_with_none_env_id_is_rejected() -> None:
    """None means "all envs" only for clear_init_caches; elsewhere it is a bad env id."""
    m = manager()
    assert_manager_rejected(m, EnvIdError, IndexError, lambda: m.get_init_cache(None, 10))
    assert_manager_rejected(m, EnvIdError, IndexError, lambda: m.set_init_cache(None, 10, entry(9.0)))



@pytest.mark.parametrize(
    "call, exc, builtin",
    [
        pytest.param(lambda m: m.set_init_cache(0, "k", entry(9.0)), InvalidKeyError, TypeError, id="init-key"),
        pytest.param(lambda m: m.set_recur_cache(-1, entry(9.0)), InvalidKeyError, TypeError, id="recur-key"),
        pytest.param(lambda m: m.get_wm_cache(2**64), InvalidKeyError, TypeError, id="wm-key"),
        pytest.param(lambda m: m.hierarchical_get(0, None), InvalidKeyError, TypeError, id="hier-key"),
        pytest.param(lambda m: m.set_init_cache(0, 10, None), InvalidEntryError, TypeError, id="init-entry"),
        pytest.param(lambda m: m.set_recur_cache(20, entry(9.0, layers=3)), EntryMismatchError, ValueError, id="recur-layers"),
        pytest.param(lambda m: m.set_wm_cache(30, entry(9.0, dtype=torch.float64)), EntryMismatchError, ValueError, id="wm-dtype"),
        pytest.param(lambda m: m.get_recur_cache(20, out=entry(0.0, heads=4)), EntryMismatchError, ValueError, id="recur-out"),
    ],
)
def test_manager_forwards_pool_validation(call: Callable[[KVCacheManager], Any], exc: Any, builtin: Any) -> None:
    """Bad keys and entries given to the manager are rejected by the pool, changing nothing anywhere."""
    m = manager()
    assert_manager_rejected(m, exc, builtin, lambda: call(m))



MANAGER_CALLS = [
    pytest.param(lambda m: m.get_init_cache(0, 10), id="get_init_cache"),
    pytest.param(lambda m: m.set_init_cache(0, 10, entry(1.0)), id="set_init_cache"),
    pytest.param(lambda m: m.get_recur_cache(20), id="get_recur_cache"),
    pytest.param(lambda m: m.set_recur_cache(20, entry(1.0)), id="set_recur_cache"),
    pytest.param(lambda m: m.get_wm_cache(30), id="get_wm_cache"),
    pytest.param(lambda m: m.set_wm_cache(30, entry(1.0)), id="set_wm_cache"),
    pytest.param(lambda m: m.hierarchical_get(0, 20), id="hierarchical_get"),
    pytest.param(lambda m: m.clear_all(), id="clear_all"),
    pytest.param(lambda m: m.clear_init_caches(), id="clear_init_caches-all"),
    pytest.param(lambda m: m.clear_init_caches(1), id="clear_init_caches-one"),
    pytest.param(lambda m: m.clear_recur_cache(), id="clear_recur_cache"),
    pytest.param(lambda m: m.check(), id="check"),
]



@pytest.mark.parametrize("call", MANAGER_CALLS)
def test_manager_use_after_close_raises_closed_error(call: Callable[[KVCacheManager], Any]) -> None:
    """After close(), every cache operation raises ClosedError (a RuntimeError)."""
    m = manager()
    m.close()
    m.close()  # idempotent
    assert all(p.closed for p in m.pools())
    assert_raises(ClosedError, RuntimeError, lambda: call(m))
