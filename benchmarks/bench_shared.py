"""Shared-pool costs against in-process pools and the usual ways to move tensors between processes.

    .venv/bin/python benchmarks/bench_shared.py            # full run (~1-2 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_shared.py --quick    # a smoke run

Per entry size (8 KiB CartPole, 96 KiB Atari, 1.27 MiB Memory env) it prints p50 latency per call:
``copy_`` of the same bytes (the floor), the in-process pool, the shared pool (get into a buffer,
set, get miss and lease = the metadata path without copying), a ``multiprocessing.Manager().dict()``
get/set of the same tensor, and a tensor sent through ``torch.multiprocessing.Queue`` to another
process. Then aggregate throughput of 1 vs 2 worker processes on one shared pool. Ratios are
computed from numbers measured in this run; no assertion.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from typing import Dict

import torch

from _common import SIZES, manager_dict, p50_us, torch_queue
from concurrent_kv import EntrySpec, KVCachePool
from concurrent_kv.workload import fill_entry


def pool_ops(pool: KVCachePool, spec: EntrySpec, n: int) -> Dict[str, float]:
    entry = fill_entry(spec.empty_entry(), 7)
    out = spec.empty_entry()
    for k in range(pool.capacity or 0):
        pool.set(k, entry)

    def lease() -> None:
        with pool.lease(7):
            pass

    return {
        "set": p50_us(lambda: pool.set(7, entry), n),
        "get": p50_us(lambda: pool.get(7, out=out), n),
        "miss": p50_us(lambda: pool.get(10**12), n),
        "lease": p50_us(lease, n),
    }


def _throughput_worker(handle, spec: EntrySpec, seconds: float, seed: int, out) -> None:
    import random

    torch.set_num_threads(1)
    pool = KVCachePool.attach(handle)
    rng = random.Random(seed)
    entry = fill_entry(spec.empty_entry(), seed)
    buf = spec.empty_entry()
    ops = 0
    keys = pool.capacity or 1
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        key = rng.randrange(keys)
        if rng.random() < 0.5:
            pool.get(key, out=buf)
        else:
            pool.set(key, entry)
        ops += 1
    pool.close()
    out.put(ops)


def throughput(spec: EntrySpec, processes: int, seconds: float) -> float:
    pool = KVCachePool(256, shared=True, entry_spec=spec, name="bench")
    try:
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=_throughput_worker, args=(pool.handle(), spec, seconds, i, out))
                 for i in range(processes)]
        for p in procs:
            p.start()
        total = sum(out.get() for _ in procs)
        for p in procs:
            p.join()
        return total / seconds
    finally:
        pool.close()


def trace_steps_per_s(processes: int, steps: int) -> float:
    """UniZero-shaped collectors (8 envs, 25 sims, 96 KiB entries, every read verified) as
    ``processes`` worker processes sharing one manager; 2 collectors in all."""
    from concurrent_kv.workload import WorkloadConfig, make_manager, run_processes

    cfg = WorkloadConfig(env_num=8, collectors=2, steps=steps, shared_keys=0.25)
    with make_manager(cfg, shared=True) as manager:
        result = run_processes(manager, cfg, processes, "fork")
    assert result.all_hits_verified, result.total.errors
    return result.total.steps / result.elapsed_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls, one size")
    parser.add_argument("-n", type=int, default=3000, help="calls per measurement")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    args = parser.parse_args()
    n = 300 if args.quick else args.n
    seconds = 0.5 if args.quick else args.seconds
    sizes = ["96KiB"] if args.quick else list(SIZES)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; p50 of {n} calls (us)")
    for size in sizes:
        spec = SIZES[size]
        src = fill_entry(spec.empty_entry(), 1)._block
        dst = torch.empty_like(src)
        floor = p50_us(lambda: dst.copy_(src), n)
        local = pool_ops(KVCachePool(64, entry_spec=spec), spec, n)
        shared_pool = KVCachePool(64, shared=True, entry_spec=spec, name="bench")
        try:
            shared = pool_ops(shared_pool, spec, n)
        finally:
            shared_pool.close()
        md = manager_dict(spec, max(50, n // 10))
        queue_us = torch_queue(spec, max(50, n // 10))
        print(f"\n{size} ({spec.nbytes:,} B)   copy_ floor {floor:.1f}")
        print(f"{'':28}{'set':>9}{'get':>9}{'miss':>9}{'lease':>9}")
        print(f"{'in-process pool':28}" + "".join(f"{local[k]:9.1f}" for k in ("set", "get", "miss", "lease")))
        print(f"{'shared pool':28}" + "".join(f"{shared[k]:9.1f}" for k in ("set", "get", "miss", "lease")))
        print(f"{'Manager().dict()':28}{md['set']:9.1f}{md['get']:9.1f}")
        print(f"{'torch.mp.Queue (per item)':28}{queue_us:9.1f}")
        print(f"  shared metadata path (lease hit, no copy): {shared['lease']:.1f} us p50; get miss {shared['miss']:.1f} us")
        print(f"  shared get vs Manager dict get: {md['get'] / shared['get']:.1f}x faster; "
              f"set: {md['set'] / shared['set']:.1f}x; vs torch queue: {queue_us / shared['get']:.1f}x")
        print(f"  shared vs in-process: get {shared['get'] / local['get']:.2f}x, set {shared['set'] / local['set']:.2f}x")
    spec = SIZES["96KiB"]
    one = throughput(spec, 1, seconds)
    two = throughput(spec, 2, seconds)
    print(f"\nthroughput, 96 KiB, 50% get / 50% set on one shared pool: 1 process {one:,.0f} ops/s, "
          f"2 processes {two:,.0f} ops/s ({two / one:.2f}x)")
    steps = 5 if args.quick else 30
    t1, t2 = trace_steps_per_s(1, steps), trace_steps_per_s(2, steps)
    print(f"UniZero trace, 2 collectors as 1 process x 2 threads: {t1:,.0f} env steps/s; "
          f"as 2 processes x 1 thread: {t2:,.0f} env steps/s ({t2 / t1:.2f}x)")


if __name__ == "__main__":
    main()
