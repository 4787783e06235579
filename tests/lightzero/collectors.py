"""Real UniZero collectors sharing one manager: the body each collector process runs.

A collector builds the seeded small model, first runs its observation stream alone on LightZero's
own caches (the reference), then, attached to the shared manager as collector ``index``, runs
the same stream again in step with the other collectors, and compares every output bit for bit.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, Optional

import torch

from concurrent_kv import KVCacheManager
from concurrent_kv.integrations.lightzero import attach

from .unizero_small import ENV_NUM, build_model, run_steps, twin

STEPS = 6


def schedule(index: int) -> Dict[int, str]:
    """Each collector clears at other steps than the others, so every clear of one collector
    falls in the middle of the others' searches."""
    return {1 + index: "reset_collect", 3 + index: "clear_caches"}


def compare(ours: Dict[str, Any], reference: Dict[str, Any]) -> Dict[str, int]:
    pairs = list(zip(ours["outputs"], reference["outputs"]))
    return {
        "compared": len(pairs),
        "mismatches": sum(not torch.equal(a, b) for a, b in pairs) + abs(len(ours["outputs"]) - len(reference["outputs"])),
        "counter_mismatches": sum(ours[k] != reference[k] for k in ("recur_hits", "recur_queries", "root_hits", "root_queries")),
    }


def run_collector(handle: Any, index: int, obs_seed: int, barrier: Any, results: Any,
                  stall_at: Optional[int] = None, flushed: Any = None) -> None:
    """One collector process. With ``stall_at``, it stops at that step, holding its entries,
    sets ``flushed`` once its message is out, and waits to be killed."""
    torch.set_num_threads(1)
    base = build_model(seed=0)  # same weights in every collector
    reference = run_steps(twin(base), STEPS, seed=obs_seed, clears=schedule(index))
    manager = KVCacheManager.attach(handle)
    model = twin(base)
    adapter = attach(model.world_model, manager, mode="new", first_env=index * ENV_NUM)

    def in_step(step: int) -> None:
        try:
            barrier.wait(300)  # collectors go step by step together, so clears interleave
        except threading.BrokenBarrierError:
            pass  # a collector was killed: the rest go on, each at its own pace
        if step == stall_at:
            results.put({"index": index, "stalled": os.getpid()})
            # The kill must wait until the message is flushed and the queue's write lock let go:
            # a collector killed while its feeder thread holds that lock blocks the others' puts.
            results.close()
            results.join_thread()
            flushed.set()
            time.sleep(600)

    barrier.wait(300)
    ours = run_steps(model, STEPS, seed=obs_seed, clears=schedule(index), before_step=in_step)
    result = compare(ours, reference)
    result.update(index=index, foreign_hits=adapter.collector.foreign_hits, rejected=adapter.collector.rejected)
    adapter.close()
    manager.close()
    results.put(result)
