"""One collector loop, two caches: the workload runs on our manager and on LightZero's legacy
rings (``LegacyRingBackend``) with the same operations, which the benchmarks rely on."""

from __future__ import annotations

from concurrent_kv.testing.legacy_backend import LegacyRingBackend, legacy_init_slots
from concurrent_kv.workload import WorkloadConfig, make_manager, run_collectors

CFG = WorkloadConfig(env_num=4, collectors=1, num_simulations=6, steps=7, episode_length=3,
                     num_layers=1, num_heads=2, context_length=4, head_dim=8)


def test_legacy_backend_replays_the_managers_operation_sequence() -> None:
    with make_manager(CFG) as manager:
        ours = run_collectors(manager, CFG, timeout_s=60)
    legacy = run_collectors(LegacyRingBackend(CFG.env_num, CFG.num_simulations, CFG.spec), CFG, timeout_s=60)
    assert ours.all_hits_verified and legacy.all_hits_verified, (ours.total.errors, legacy.total.errors)
    counters = ("reads", "hits", "writes", "deletes", "clears", "steps")
    assert [getattr(legacy.total, c) for c in counters] == [getattr(ours.total, c) for c in counters]
    assert legacy.total.hits > 0


def test_legacy_backend_sizes_and_refuses_collectors_that_share_its_recur_ring() -> None:
    backend = LegacyRingBackend(2, 50, CFG.spec)
    assert [p.pool_size for p in backend.init_pools] == [legacy_init_slots(50)] * 2 == [256, 256]
    assert backend.recur_pool.pool_size == 100
    assert all(slot is not None for slot in backend.recur_pool.slots)  # allocated up front
    assert backend.hierarchical_get(0, -1) is None  # the allocation keys are cleared
    # LightZero's rings have no holds: collectors sharing them (recur_clear="own") are refused.
    own = WorkloadConfig(env_num=2, collectors=2, num_simulations=2, steps=1, num_layers=1, num_heads=2,
                         context_length=4, head_dim=8)
    errors = run_collectors(LegacyRingBackend(2, 2, own.spec), own, timeout_s=60).total.errors
    assert len(errors) == 2 and all("ConfigError" in e and "collector(envs=" in e for e in errors)
