"""Real LightZero 0.2.0 UniZero collectors in spawned worker processes on one shared manager.

Every collector's outputs must be bit-identical to its own solo run on LightZero's caches, with
each kind of clear made by one collector in the middle of the others' searches; a SIGKILLed
collector must leave the others running and its holds released. The torchrun launch is checked
with two gloo ranks on CPU.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from concurrent_kv import EntrySpec, KVCacheManager

from .collectors import STEPS, run_collector
from .unizero_small import ENV_NUM, NUM_SIM, build_model, world_model_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sizes() -> Dict[str, int]:
    wm = build_model(seed=0).world_model
    return {"init": len(wm.shared_pool_init_infer[0]), "wm": len(wm.shared_pool_wm)}


def shared_manager(collectors: int, sizes: Dict[str, int]) -> KVCacheManager:
    cfg = world_model_config()
    return KVCacheManager(
        {"init_pool_size": sizes["init"], "recur_pool_size": collectors * NUM_SIM * ENV_NUM,
         "wm_pool_size": collectors * sizes["wm"]},
        collectors * ENV_NUM, shared=True, entry_spec=EntrySpec.for_transformer(cfg))


def start_collectors(manager: KVCacheManager, seeds: List[int], victim: Optional[int] = None,
                     stall_at: int = 0):
    """One spawned collector per observation seed; collector ``victim`` stalls at ``stall_at``."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(seeds) + 1), ctx.Queue()
    flushed = ctx.Event() if victim is not None else None
    procs = [ctx.Process(target=run_collector,
                         args=(manager.handle(), i, seed, barrier, results, stall_at if i == victim else None, flushed))
             for i, seed in enumerate(seeds)]
    for p in procs:
        p.start()
    return procs, barrier, results, flushed


def stop(procs) -> None:
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()


def run_together(manager: KVCacheManager, seeds: List[int]) -> List[Dict[str, Any]]:
    """Run one collector per seed, step by step together; return their results, by index."""
    procs, barrier, results, _ = start_collectors(manager, seeds)
    try:
        for _ in range(STEPS + 1):  # the start, then each step
            barrier.wait(300)
        done = [results.get(timeout=300) for _ in seeds]
    finally:
        stop(procs)
    assert [p.exitcode for p in procs] == [0] * len(seeds)
    return sorted(done, key=lambda r: r["index"])


def run_with_a_killed_collector(manager: KVCacheManager, seeds: List[int], victim: int,
                                stall_at: int) -> List[Dict[str, Any]]:
    """As :func:`run_together`, but collector ``victim`` stalls at ``stall_at`` holding its
    entries and is SIGKILLed there; the others finish without waiting for each other."""
    procs, barrier, results, flushed = start_collectors(manager, seeds, victim, stall_at)
    try:
        for _ in range(stall_at + 2):  # the start and steps 0 .. stall_at
            barrier.wait(300)
        stalled = results.get(timeout=300)
        assert stalled == {"index": victim, "stalled": procs[victim].pid}
        assert flushed.wait(60)  # its message is out and the queue's lock free: kill it now
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].join(30)
        barrier.abort()
        done = [results.get(timeout=300) for _ in range(len(seeds) - 1)]
    finally:
        stop(procs)
    return sorted(done, key=lambda r: r["index"])


def assert_identical(results: List[Dict[str, Any]], expected: int) -> None:
    assert len(results) == expected
    for r in results:
        assert r["compared"] > 0 and r["mismatches"] == 0 and r["counter_mismatches"] == 0, r
        assert r["rejected"] == 0, r


@pytest.mark.parametrize("collectors", [2, 3])
def test_collectors_with_different_streams_match_their_solo_runs(collectors: int, sizes) -> None:
    with shared_manager(collectors, sizes) as m:
        results = run_together(m, [100 + i for i in range(collectors)])
        assert_identical(results, collectors)
        print({r["index"]: r["compared"] for r in results})
        m.recur_pool.recover()
        assert m.recur_pool.occupancy().held == 0  # every collector let go of everything at close
        m.check()


def test_collectors_with_identical_streams_share_entries_and_still_match(sizes) -> None:
    with shared_manager(2, sizes) as m:
        results = run_together(m, [7, 7])
        assert_identical(results, 2)
        recur = m.recur_pool.stats_snapshot()
        # The same keys from both collectors: the second store of a key is one copy, updated.
        assert recur.updates > 0
        m.check()


def test_a_sigkilled_collector_leaves_the_others_running_and_its_holds_released(sizes) -> None:
    with shared_manager(3, sizes) as m:
        results = run_with_a_killed_collector(m, [100, 101, 102], victim=1, stall_at=2)
        assert_identical(results, 2)
        assert [r["index"] for r in results] == [0, 2]
        m.recur_pool.recover()
        occ = m.recur_pool.occupancy()
        assert occ.held == 0 and occ.pins == 0  # the dead collector's holds went with it
        m.check()


def test_torchrun_ranks_share_one_node_manager(tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "lightzero" / "torchrun_collector.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["compared"] > 0 and r["mismatches"] == 0 and r["counter_mismatches"] == 0, r
    assert ranks[0]["recur_pool"] == ranks[1]["recur_pool"]  # one manager on the node
    assert ranks[0]["first_env"] == 0 and ranks[1]["first_env"] == ENV_NUM
