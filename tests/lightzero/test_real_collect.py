"""The real collector path (its own tier: ./dev lightzero): ``enable(policy)`` on LightZero 0.2.0's
UniZero policy built from the zoo config, and the ``collect`` command end to end (two spawned
collectors per phase, LightZero's MuZeroCollector and C++ tree, CartPole)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from concurrent_kv import ConfigError, KVCacheManager
from concurrent_kv.integrations.lightzero import IntegrationError, enable
from concurrent_kv.integrations.lightzero_collect import CollectSettings, build_policy, entry_spec, shared_manager

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = CollectSettings(collectors=2, envs=2, simulations=4)


@pytest.fixture(scope="module")
def policy():
    """One real policy for the module: building one takes about 10 s here (30 s on a busy machine)."""
    return build_policy(SETTINGS)


def collect_forward(policy, seed: int = 0):
    """One batched search of collect mode over both envs, seeded (root noise included)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    policy.collect_mode.reset()
    obs = torch.from_numpy(np.random.RandomState(seed + 1).randn(SETTINGS.envs, 4).astype(np.float32))
    masks = [np.ones(2, dtype=np.int8)] * SETTINGS.envs
    out = policy.collect_mode.forward(obs, masks, 1.0, [-1] * SETTINGS.envs, 0.0,
                                      ready_env_id=list(range(SETTINGS.envs)), timestep=[0] * SETTINGS.envs)
    return [(o["action"], o["searched_value"], list(o["visit_count_distributions"])) for o in out.values()]


def test_enable_on_a_real_policy_searches_the_same_and_uses_the_manager(policy) -> None:
    legacy = collect_forward(policy)
    adapters = enable(policy)  # learn + collect: one world model (eval mode not enabled)
    try:
        assert len(adapters) == 1
        assert adapters[0].world_model is policy._collect_model.world_model
        assert adapters[0].mode == "new" and adapters[0].manager.env_num == SETTINGS.envs
        assert collect_forward(policy) == legacy
        recur = adapters[0].manager.recur_pool.stats_snapshot()
        assert recur.inserts == SETTINGS.simulations * SETTINGS.envs and recur.hits > 0
    finally:
        adapters[0].close()
        adapters[0].manager.close()
    assert collect_forward(policy) == legacy  # closed: LightZero's own caches again


def test_enable_takes_a_launchers_handle_and_a_range_of_envs(policy, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONCURRENT_KV_SHM_DIR", str(tmp_path))
    with shared_manager(SETTINGS, entry_spec(SETTINGS)) as manager:
        adapters = enable(policy, handle=manager.handle(), first_env=SETTINGS.envs)
        try:
            assert adapters[0].collector.first_env == SETTINGS.envs
            collect_forward(policy)
            assert sum(p.stats_snapshot().inserts for p in manager.init_pools[SETTINGS.envs:]) > 0
            assert all(p.stats_snapshot().inserts == 0 for p in manager.init_pools[:SETTINGS.envs])
            assert manager.recur_pool.stats_snapshot().inserts > 0  # written through the handle's attachment
        finally:
            adapters[0].close()
            adapters[0].manager.close()
    assert os.listdir(tmp_path) == []


def test_enable_refuses_what_is_not_a_unizero_policy(policy) -> None:
    with pytest.raises(IntegrationError, match="collect_mode"):
        enable(policy.collect_mode)
    with pytest.raises(IntegrationError):
        enable(object())
    with pytest.raises(ConfigError):
        enable(policy, mode="turbo")
    small = KVCacheManager({"num_simulations": 1}, 1)
    with pytest.raises(ConfigError, match="do not fit"):
        enable(policy, small)
    small.collector(0).close()  # the failed enable left no claim behind
    small.close()


def test_collect_command_runs_both_phases_and_leaves_no_shared_memory(tmp_path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    out = tmp_path / "collect.json"
    env = dict(os.environ, CONCURRENT_KV_SHM_DIR=str(shm), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "concurrent_kv", "collect", "--collectors", "2", "--envs", "2",
           "--simulations", "4", "--steps", "16", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "shared manager / LightZero's caches" in run.stdout and "hits on entries another collector" in run.stdout
    data = json.loads(out.read_text())
    assert data["ok"] and data["ratio"] > 0
    for phase in ("lightzero", "shared"):
        p = data["phases"][phase]
        assert [r["index"] for r in p["reports"]] == [0, 1] and p["errors"] == []
        assert p["steps"] >= 16 and p["steps_per_s"] > 0 and p["steps_per_cpu_s"] > 0
        assert all(r["recur_queries"] > 0 for r in p["reports"])
    shared, legacy = data["phases"]["shared"], data["phases"]["lightzero"]
    assert [r["first_env"] for r in shared["reports"]] == [0, 2]
    assert all("foreign_hits" in r and "rejected" in r for r in shared["reports"])
    assert set(shared["pools"]) == {"init_env0", "init_env1", "init_env2", "init_env3", "recurrent", "world_model"}
    assert all({"hits", "misses", "inserts", "evictions", "hit_rate"} <= set(s) for s in shared["pools"].values())
    assert shared["pools"]["recurrent"]["inserts"] > 0
    assert shared["kv_bytes"] > 0 and legacy["kv_bytes"] > 0
    assert os.listdir(shm) == []  # every segment unlinked
