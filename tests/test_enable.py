"""``enable(policy)`` on stand-in policies, and the ``collect`` command's parts that need no LightZero.

The real policy and the command end to end are tested in tests/lightzero/test_real_collect.py.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from concurrent_kv import AttachError, ConfigError, KVCacheManager
from concurrent_kv.cli import main
from concurrent_kv.collect_cli import PhaseResult, report
from concurrent_kv.integrations.lightzero import IntegrationError, enable
from concurrent_kv.integrations.lightzero_collect import CollectSettings

from .test_lightzero_adapter import SPEC, StandInWorldModel


def stand_in_policy(eval_model_separate: bool = False) -> SimpleNamespace:
    """What enable reads of a UniZero policy: its collect and eval models' world models."""
    collect = SimpleNamespace(world_model=StandInWorldModel(env_num=2))
    evaluate = SimpleNamespace(world_model=StandInWorldModel(env_num=3)) if eval_model_separate else collect
    return SimpleNamespace(_collect_model=collect, _eval_model=evaluate, _target_model=SimpleNamespace(
        world_model=StandInWorldModel(env_num=2)))


def test_one_adapter_when_collect_and_eval_share_the_model() -> None:
    policy = stand_in_policy()
    adapters = enable(policy)
    assert len(adapters) == 1 and adapters[0].mode == "new"
    assert adapters[0].world_model is policy._collect_model.world_model
    assert "_PoolMap" in type(policy._collect_model.world_model.past_kv_cache_recurrent_infer).__name__
    assert isinstance(policy._target_model.world_model.past_kv_cache_recurrent_infer, dict)  # left alone
    assert adapters[0].manager.env_num == 2


def test_a_separate_eval_model_takes_the_next_envs_of_the_same_manager() -> None:
    policy = stand_in_policy(eval_model_separate=True)
    adapters = enable(policy, first_env=1)
    collect, evaluate = adapters
    assert collect.manager is evaluate.manager and collect.manager.env_num == 1 + 2 + 3
    assert (collect.collector.first_env, evaluate.collector.first_env) == (1, 3)
    # Its recur pool holds both world models' searches, as their own pools together would.
    assert collect.manager.recur_pool.capacity == 2 * 4
    for adapter in adapters:
        adapter.close()
    collect.manager.collector(0).close()  # every claim released


def test_a_manager_too_small_is_refused_and_left_unclaimed() -> None:
    manager = KVCacheManager({"num_simulations": 2}, 4)
    with pytest.raises(ConfigError, match="do not fit"):
        enable(stand_in_policy(eval_model_separate=True), manager)  # 2 + 3 envs > 4
    manager.collector(0).close()  # the collect model's claim was undone
    manager.close()


def test_enable_on_a_shared_manager_by_handle(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONCURRENT_KV_SHM_DIR", str(tmp_path))
    with KVCacheManager({"num_simulations": 2}, 4, shared=True, entry_spec=SPEC) as owner:
        adapters = enable(stand_in_policy(), handle=owner.handle(), first_env=2)
        assert adapters[0].manager is not owner and adapters[0].manager.shared
        assert adapters[0].collector.init_pools[0].name == "init_env2"
        adapters[0].close()
        adapters[0].manager.close()
        with pytest.raises(ConfigError, match="not in shared memory"):
            enable(stand_in_policy(), KVCacheManager({"num_simulations": 2}, 2), shared=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, error, match", [
    (dict(policy=None), IntegrationError, "policy instance"),
    (dict(policy=SimpleNamespace()), IntegrationError, "not a UniZero policy"),
    (dict(policy=SimpleNamespace(_collect_model=SimpleNamespace(world_model=object()))), IntegrationError, "seams"),
    (dict(first_env=-1), ConfigError, "first_env"),
    (dict(first_env=True), ConfigError, "first_env"),
    (dict(mode="turbo"), ConfigError, "mode"),
    (dict(shared="yes"), ConfigError, "shared"),
    (dict(manager="a manager"), ConfigError, "manager"),
    (dict(handle="a handle"), AttachError, "ManagerHandle"),
])
def test_enable_validates_its_inputs(bad, error, match) -> None:
    kwargs = dict(bad)
    policy = kwargs.pop("policy", stand_in_policy())
    with pytest.raises(error, match=match):
        enable(policy, **kwargs)


def test_a_manager_and_a_handle_are_exclusive() -> None:
    with KVCacheManager({"num_simulations": 2}, 2) as manager:
        with pytest.raises(ConfigError, match="not both"):
            enable(stand_in_policy(), manager, handle=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value", [("collectors", 0), ("envs", -1), ("simulations", 1.5), ("threads", True),
                                          ("seconds", 0), ("seconds", float("inf")), ("steps", 0), ("seed", -1),
                                          ("env", "pong"), ("checkpoint", "/no/such/file"), ("zero_heads", 1)])
def test_collect_settings_validate(field: str, value: object) -> None:
    with pytest.raises(ConfigError):
        CollectSettings(**{field: value})


def test_collect_settings_split_steps_over_collectors() -> None:
    s = CollectSettings(collectors=3, envs=2, steps=10)
    assert (s.manager_envs, s.steps_per_collector) == (6, 4)
    assert CollectSettings().steps_per_collector is None


def test_collect_command_without_lightzero_or_with_bad_options_exits_2(capsys, monkeypatch) -> None:
    assert main(["collect", "--collectors", "0"]) == 2
    assert "collectors" in capsys.readouterr().err
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["collect", "--seconds", "1"]) == 2
    assert "./dev collect" in capsys.readouterr().err


def _phase(phase: str, **extra: int) -> PhaseResult:
    reports = [dict(index=i, first_env=2 * i, envs=2, steps=50, elapsed_s=2.0, cpu_s=1.0, root_hits=40, root_queries=50,
                    recur_hits=190, recur_queries=200, **extra) for i in range(2)]
    return PhaseResult(phase, reports, kv_bytes=4096)


def test_the_report_shows_both_phases_and_their_ratio() -> None:
    shared = _phase("shared", foreign_hits=3, rejected=1)
    shared.pools = {"recurrent": dict(capacity=8, hits=5, misses=1, hit_rate=5 / 6, inserts=4, updates=0,
                                      evictions=0)}
    text = report(CollectSettings(), _phase("lightzero"), shared)
    assert "1.00x env steps/s, 1.00x env steps per CPU second" in text and "50.0" in text and "foreign hits" in text
    assert "recomputed by the world model: 40" in text and "counted by each collector): 2" in text
    assert "another collector wrote: 6" in text
    assert shared.as_dict()["steps_per_s"] == 50.0 and shared.steps_per_cpu_s == 50.0 and shared.ok
