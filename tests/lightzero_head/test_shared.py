"""Several main-branch collector processes on one shared manager (integrations/lightzero_head.py).

The parent creates a ``shared=True`` manager with init pools for every collector's envs and hands
its handle to two spawned collector processes. Each calls ``use_for_main_branch(handle,
env_offset=...)`` and builds the main-branch model: the world model's manager attaches to the
shared init pools of its own envs and shares the recur pool, holding what it stores there, so each
collector's per-search clear releases only its own entries. Both run at once; each must produce,
bit for bit, what the same run gives with LightZero's own manager in one process (the recur keys
it holds after every call and its own recur hits and misses included), and the parent then sees
their root entries and counters in the shared pools.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Dict

import pytest
import torch

from .source import require_main_branch

require_main_branch()

from concurrent_kv import KVCacheManager  # noqa: E402
from concurrent_kv.errors import ConfigError  # noqa: E402
from concurrent_kv.integrations.lightzero_head import use_for_main_branch  # noqa: E402

from . import head_small as H  # noqa: E402
from .workers import collector  # noqa: E402

WORKERS = 2
SEEDS = {0: 100, H.ENV_NUM: 200}  # env_offset -> observation seed


def shared_manager() -> KVCacheManager:
    config = dict(H.world_model_config())
    solo = KVCacheManager(config, env_num=H.ENV_NUM)  # sized as LightZero main sizes one collector's
    recur, wm = solo.recur_pool.capacity, solo.wm_pool.capacity
    solo.close()
    config.update(recur_pool_size=WORKERS * recur, wm_pool_size=WORKERS * wm)  # room for every collector
    return KVCacheManager(config, env_num=WORKERS * H.ENV_NUM, shared=True)


def test_two_collector_processes_share_one_manager() -> None:
    base = H.build_model(seed=0)
    refs: Dict[int, H.Result] = {off: H.run(H.twin_with_weights(base), seed=seed) for off, seed in SEEDS.items()}
    with shared_manager() as manager:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=collector, args=(manager.handle(), off, seed, results)) for off, seed in SEEDS.items()]
        for p in procs:
            p.start()
        got: Dict[int, Any] = {}
        for _ in procs:
            off, digest, outputs, counters, pool_stats, key_sets, kind = results.get(timeout=240)
            assert digest != "error", outputs
            got[off] = (digest, outputs, counters, pool_stats, key_sets, kind)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0

        for off, ref in refs.items():
            digest, outputs, counters, pool_stats, key_sets, kind = got[off]
            assert kind == "AttachedKVCacheManager" and digest == H.weights_digest(base)
            assert [n for n, _ in outputs] == [n for n, _ in ref.outputs]
            bad = [i for i, ((_, a), (_, b)) in enumerate(zip(outputs, ref.outputs)) if not torch.equal(torch.from_numpy(a), b)]
            assert bad == []
            assert ref.pool_stats["recurrent"][2] == 0  # alone, nothing was evicted: holds change nothing
            assert counters == ref.counters and pool_stats == ref.pool_stats and key_sets == ref.key_sets
            H.COMPARED[f"shared, collector at env {off}"] = (ref.count("initial."), ref.count("recurrent."), len(bad))
            # The parent sees this collector's root entries in the shared pools of its envs.
            for e in range(H.ENV_NUM):
                assert set(manager.init_pools[off + e]._key_to_index) == set(key_sets[-1][f"init_env{e}"])
                assert manager.init_pools[off + e].stats_snapshot().hits == ref.pool_stats[f"init_env{e}"][0]
        manager.check()


def test_a_world_model_too_wide_for_the_shared_pools_is_refused() -> None:
    with shared_manager() as manager:
        with use_for_main_branch(manager.handle(), env_offset=WORKERS * H.ENV_NUM - 1):
            with pytest.raises(ConfigError, match="init pools"):
                H.build_model(seed=0)
        with use_for_main_branch(manager.handle()):
            with pytest.raises(ConfigError, match="entries"):
                H.build_model(seed=0, embed_dim=64)
            model = H.build_model(seed=0)  # in this process too: it attaches, and shares the pools
            assert model.world_model.kv_cache_manager.init_pools[0].shared
            model.world_model.kv_cache_manager.close()
