"""Soak: worker processes x threads hammer one shared manager while the owner SIGKILLs workers
at random and clears pools at random; every read is verified, invariants are checked at
intervals, and nothing may leak.

    .venv/bin/python -m tests.stress.soak --soak-seconds 600      # by hand
    (tests/stress/test_soak.py runs it for a few seconds in CI)

Prints a summary: operations, verified reads, corrupt reads (must be 0), kills survived,
recovery times after each kill, invariant checks, and leaked segments / descriptors / processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from typing import Any, Dict

import torch

from concurrent_kv import EntrySpec, KVCacheManager, PoolExhaustedError
from concurrent_kv.workload import fill_entry, verify_entry

from ..helpers import segment_fds

SPEC = EntrySpec(num_layers=2, num_samples=1, num_heads=2, max_tokens=4, head_dim=8)
COUNTERS = ("ops", "reads", "verified", "corrupt", "errors")


def _worker(handle: Any, slot: int, counters: Any, stop: Any, threads: int, seed: int, error_log: str) -> None:
    """Random manager operations from ``threads`` threads; counters flushed to shared memory."""
    torch.set_num_threads(1)
    manager = KVCacheManager.attach(handle)
    base = slot * len(COUNTERS)
    guard = threading.Lock()

    def body(t: int) -> None:
        rng = random.Random(seed * 100 + t)
        entry = SPEC.empty_entry()
        buf = SPEC.empty_entry()
        local = dict.fromkeys(COUNTERS, 0)
        while not stop.value:
            key = rng.randrange(64)
            env = rng.randrange(manager.env_num)
            r = rng.random()
            try:
                if r < 0.35:
                    got = manager.hierarchical_get(env, key, out=buf)
                elif r < 0.5:
                    with manager.recur_pool.lease(key) as got:
                        if got is not None and not verify_entry(got, key):
                            local["corrupt"] += 1
                        got = None
                        local["reads"] += 1
                elif r < 0.75:
                    manager.set_recur_cache(key, fill_entry(entry, key, slot))
                    got = None
                elif r < 0.95:
                    manager.set_init_cache(env, key, fill_entry(entry, key, slot))
                    got = None
                else:
                    manager.recur_pool.delete(key)
                    got = None
                if r < 0.35:
                    local["reads"] += 1
                    if got is not None:
                        if verify_entry(got, key):
                            local["verified"] += 1
                        else:
                            local["corrupt"] += 1
            except PoolExhaustedError:
                pass
            except Exception as exc:
                local["errors"] += 1
                with open(error_log, "a") as f:  # a file survives a SIGKILL; a queue might not
                    f.write(f"{type(exc).__name__}: {exc}\n")
            local["ops"] += 1
            if local["ops"] % 50 == 0:
                with guard:  # flush: a SIGKILL loses at most the last 50 ops of a thread
                    for i, name in enumerate(COUNTERS):
                        counters[base + i] += local[name]
                local = dict.fromkeys(COUNTERS, 0)
        with guard:
            for i, name in enumerate(COUNTERS):
                counters[base + i] += local[name]

    ts = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    manager.close()


def soak(seconds: float, processes: int = 2, threads: int = 2, kill_every: float = 0.5, seed: int = 0) -> Dict[str, Any]:
    rng = random.Random(seed)
    ctx = mp.get_context("fork")
    max_slots = 64  # worker slots in the shared counter array (each restart takes a new one)
    counters = ctx.Array("q", max_slots * len(COUNTERS), lock=False)
    # A lock-free flag: an mp.Event takes a semaphore in is_set(), and a worker SIGKILLed while
    # holding it would leave every other process blocked for ever (concurrency-notes 3.1).
    stop = ctx.RawValue("b", 0)
    manager = KVCacheManager({"num_simulations": 8, "init_pool_size": 16}, 2, shared=True, entry_spec=SPEC)
    paths = [p for h in manager.handle().pools for p in (h.meta_path, h.data_path)]
    handle = manager.handle()
    next_slot = 0
    workers: Dict[int, Any] = {}
    error_log = os.path.join(tempfile.mkdtemp(prefix="ckv-soak-"), "errors.txt")

    def start_worker() -> None:
        nonlocal next_slot
        p = ctx.Process(target=_worker, args=(handle, next_slot, counters, stop, threads, seed * 1000 + next_slot,
                                              error_log))
        p.start()
        workers[next_slot] = p
        next_slot += 1

    try:
        for _ in range(processes):
            start_worker()
        kills, recoveries, checks, clears = 0, [], 0, 0
        probe = SPEC.empty_entry()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and next_slot < max_slots:
            time.sleep(rng.uniform(0.2, 2 * kill_every))
            if rng.random() < 0.3:
                (manager.clear_recur_cache if rng.random() < 0.5 else manager.clear_all)()
                clears += 1
            victim_slot = rng.choice(list(workers))
            victim = workers.pop(victim_slot)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            kills += 1
            start = time.monotonic()
            key = 10_000 + kills  # recovered when the owner can write and then read every pool
            manager.set_recur_cache(key, fill_entry(probe, key, 99))
            got = manager.get_recur_cache(key)
            for env in range(manager.env_num):
                manager.get_init_cache(env, key)
            recoveries.append(time.monotonic() - start)
            # The workers may already have evicted the probe (16 recur slots, 64 keys in play),
            # but whatever a read returns must be the probe's own, untorn entry.
            assert got is None or verify_entry(got, key), "the pool served a wrong entry after a kill"
            manager.check()
            checks += 1
            start_worker()
    finally:
        # Stop and reap every worker even when an assertion above failed: a worker left
        # running would hammer the pool (and the CPU) long after the test is over.
        stop.value = 1
        for p in workers.values():
            p.join(30)
            if p.is_alive():  # pragma: no cover - reported as a leak below
                p.kill()
                p.join(10)
    manager.recur_pool.recover()
    manager.check()
    checks += 1
    totals = {name: sum(counters[s * len(COUNTERS) + i] for s in range(next_slot)) for i, name in enumerate(COUNTERS)}
    try:
        with open(error_log) as f:
            error_examples = sorted(set(f.read().splitlines()))[:10]
    except FileNotFoundError:
        error_examples = []
    manager.close()
    return {
        "seconds": seconds,
        "processes": processes,
        "threads_per_process": threads,
        **totals,
        "kills_survived": kills,
        "recovery_s_max": max(recoveries) if recoveries else 0.0,
        "recovery_s_p50": statistics.median(recoveries) if recoveries else 0.0,
        "invariant_checks": checks,
        "random_clears": clears,
        "leaked_segments": [p for p in paths if os.path.exists(p)],
        "leaked_fds": segment_fds(),
        "leaked_processes": [p.pid for p in workers.values() if p.is_alive()],
        "error_examples": error_examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak-seconds", type=float, default=30.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    summary = soak(args.soak_seconds, args.processes, args.threads, seed=args.seed)
    print(json.dumps(summary, indent=2))
    bad = summary["corrupt"] or summary["leaked_segments"] or summary["leaked_fds"] or summary["leaked_processes"]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
