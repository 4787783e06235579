"""concurrent_kv/config.py: ManagerConfig's pool sizes (LightZero's rules), accepted forms, bad values."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable

import pytest

from concurrent_kv import EvictionStrategy, KVCacheManager, ManagerConfig
from concurrent_kv.errors import ConfigError

from .helpers import entry
from .validation_helpers import assert_raises

# ---------------------------------------------------------------------------------------------
# Pool sizes and strategies (the starting design's construction behaviours)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_simulations, max_cache_size, env_num, init, recur",
    [
        (50, 5000, 8, 256, 400),  # LightZero's Atari defaults
        (25, 5000, 4, 256, 100),
        (200, 5000, 2, 400, 400),  # 2*num_simulations beats 256
        (200, 300, 3, 300, 600),  # capped by max_cache_size
        (10, 100, 1, 100, 10),  # max_cache_size below 256
    ],
)
def test_manager_construction_uses_lightzero_size_rules(
    num_simulations: int, max_cache_size: int, env_num: int, init: int, recur: int
) -> None:
    """init = min(max_cache_size, max(256, 2*num_sim)), recur = num_sim*env_num, wm = env_num."""
    m = KVCacheManager({"num_simulations": num_simulations, "max_cache_size": max_cache_size}, env_num=env_num)
    assert m.env_num == env_num
    assert len(m.init_pools) == env_num
    assert all(p.capacity == init for p in m.init_pools)
    assert len({id(p) for p in m.init_pools}) == env_num  # one distinct pool per env
    assert m.recur_pool.capacity == recur
    assert m.wm_pool.capacity == env_num
    assert m.pools() == [*m.init_pools, m.recur_pool, m.wm_pool]
    # Defaults: num_simulations=50, max_cache_size=5000.
    d = KVCacheManager({}, env_num=2)
    assert [p.capacity for p in d.pools()] == [256, 256, 100, 2]
    assert KVCacheManager(None, env_num=1).recur_pool.capacity == 50



def test_manager_size_and_strategy_overrides() -> None:
    """init_pool_size / recur_pool_size / wm_pool_size and per-pool strategies override the rules."""
    m = KVCacheManager(
        {
            "num_simulations": 50,
            "init_pool_size": 7,
            "recur_pool_size": 11,
            "wm_pool_size": 3,
            "init_eviction_strategy": "lru",
            "recur_eviction_strategy": EvictionStrategy.PRIORITY,
            "lock": "mutex",
        },
        env_num=2,
    )
    assert [p.capacity for p in m.pools()] == [7, 7, 11, 3]
    assert all(p.eviction_strategy == EvictionStrategy.LRU for p in m.init_pools)
    assert m.recur_pool.eviction_strategy == EvictionStrategy.PRIORITY
    assert m.wm_pool.eviction_strategy == EvictionStrategy.FIFO
    # LRU really applies to the init pools.
    for k in range(7):
        m.set_init_cache(0, k, entry(k))
    assert m.get_init_cache(0, 0) is not None  # refresh key 0
    m.set_init_cache(0, 7, entry(7))
    assert 0 in m.init_pools[0] and 1 not in m.init_pools[0]
    m.check()



# ---------------------------------------------------------------------------------------------
# Config forms: dict, dataclass, attribute object, EasyDict-like dict, ManagerConfig
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _WorldModelCfg:
    """A dataclass standing in for a world-model config: extra fields are ignored."""

    num_simulations: int = 200
    max_cache_size: int = 300
    context_length: int = 8
    embed_dim: int = 768



class _AttrDict(dict):
    """A tiny EasyDict: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None



@pytest.mark.parametrize(
    "make_config",
    [
        pytest.param(lambda: {"num_simulations": 200, "max_cache_size": 300, "context_length": 8}, id="dict"),
        pytest.param(lambda: _WorldModelCfg(), id="dataclass"),
        pytest.param(
            lambda: types.SimpleNamespace(num_simulations=200, max_cache_size=300, embed_dim=768), id="namespace"
        ),
        pytest.param(lambda: _AttrDict(num_simulations=200, max_cache_size=300, env_num=99), id="easydict"),
        pytest.param(lambda: ManagerConfig(num_simulations=200, max_cache_size=300), id="ManagerConfig"),
    ],
)
def test_manager_config_from_any_form(make_config: Callable[[], Any]) -> None:
    """Dict, dataclass, attribute object, EasyDict-like dict and ManagerConfig configure alike."""
    m = KVCacheManager(make_config(), env_num=3)
    assert m.config.num_simulations == 200 and m.config.max_cache_size == 300
    assert [p.capacity for p in m.pools()] == [300, 300, 300, 600, 3]
    assert m.env_num == 3  # a config's own env_num does not override the argument



# ---------------------------------------------------------------------------------------------
# Validation: every known field, whatever the config's form
# ---------------------------------------------------------------------------------------------

BAD_CONFIG_VALUES = [
    ("num_simulations", 0),
    ("num_simulations", -5),
    ("num_simulations", True),
    ("num_simulations", 2.5),
    ("num_simulations", "50"),
    ("num_simulations", None),
    ("max_cache_size", 0),
    ("max_cache_size", 10.0),
    ("init_pool_size", 0),
    ("init_pool_size", -3),
    ("init_pool_size", 1.5),
    ("init_pool_size", False),
    ("recur_pool_size", 0),
    ("recur_pool_size", "8"),
    ("wm_pool_size", -1),
    ("init_eviction_strategy", "random"),
    ("recur_eviction_strategy", "lifo"),
    ("wm_eviction_strategy", 5),
    ("init_eviction_strategy", None),
    ("lock", "spin"),
    ("lock", None),
    ("lock_timeout", 0),
    ("lock_timeout", -1),
    ("lock_timeout", math.nan),
    ("lock_timeout", math.inf),
    ("lock_timeout", "1"),
    ("lock_timeout", True),
]



@pytest.mark.parametrize("field, value", BAD_CONFIG_VALUES)
@pytest.mark.parametrize("form", ["dict", "namespace", "ManagerConfig"])
def test_manager_rejects_bad_config_values(field: str, value: Any, form: str) -> None:
    """Every known config field is validated, whatever the config's form: ConfigError (a ValueError)."""
    values = {"num_simulations": 4, field: value}
    if form == "dict":
        make = lambda: KVCacheManager(values, env_num=2)  # noqa: E731
    elif form == "namespace":
        make = lambda: KVCacheManager(types.SimpleNamespace(**values), env_num=2)  # noqa: E731
    else:
        make = lambda: ManagerConfig(**values)  # noqa: E731
    assert_raises(ConfigError, ValueError, make)



def test_manager_rejects_bad_config_dataclass() -> None:
    @dataclasses.dataclass
    class Cfg:
        num_simulations: int = 0
        context_length: int = 8

    assert_raises(ConfigError, ValueError, lambda: KVCacheManager(Cfg(), env_num=2))



@pytest.mark.parametrize("config", [5, "config", [("num_simulations", 5)], 3.0, b"x"])
def test_manager_rejects_config_of_wrong_type(config: Any) -> None:
    """A config that is not a dict, dataclass or attribute object raises ConfigError."""
    assert_raises(ConfigError, ValueError, lambda: KVCacheManager(config, env_num=2))
