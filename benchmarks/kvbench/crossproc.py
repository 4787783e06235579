"""Moving entries between processes: the usual transports (``multiprocessing.Manager().dict()``,
``torch.multiprocessing.Queue``), and the scaling section: one shared pool's throughput and the
UniZero trace with 1 and 2 worker processes."""

from __future__ import annotations

import multiprocessing as mp
import random
from functools import partial
from typing import Any, Dict, List

import torch
import torch.multiprocessing as tmp

from concurrent_kv import EntrySpec, KVCachePool
from concurrent_kv.workload import fill_entry

from .results import Row, Rows
from .settings import SIZES, Settings, Task
from .timing import Stats, Stopwatch, batch, latency, now
from .trace import run_ours_processes

THROUGHPUT_SLOTS = 256
SCALING_SHARED_KEYS = 0.25  # chance a child state is common to every env, as the demo's processes run


def manager_dict_ops(spec: EntrySpec, n: int) -> Dict[str, Stats]:
    """``multiprocessing.Manager().dict()`` set and get of one entry's tensor (per-call latency)."""
    with mp.Manager() as m:
        d = m.dict()
        t = fill_entry(spec.empty_entry(), 7)._block
        d[7] = t
        return {"set": latency(lambda: d.__setitem__(7, t), n, warmup=10),
                "get": latency(lambda: d[7], n, warmup=10)}


def _queue_producer(q: Any, done: Any, spec: EntrySpec, n: int) -> None:
    torch.set_num_threads(1)
    for _ in range(n + 20):
        q.put(torch.full(spec.block_shape, 1.0))  # a new tensor per item, as a collector makes
    q.put(None)
    done.wait(60)  # the fd strategy needs the sender alive until every item is received


def torch_queue(spec: EntrySpec, n: int) -> Stats:
    """Tensors sent through ``torch.multiprocessing.Queue`` from a forked producer, timed as one
    batch on the consumer side after 20 warm-up items."""
    ctx = tmp.get_context("fork")
    q = ctx.Queue(maxsize=64)
    done = ctx.Event()
    proc = ctx.Process(target=_queue_producer, args=(q, done, spec, n))
    proc.start()
    try:
        for _ in range(20):
            q.get()
        count = 0
        with Stopwatch() as sw:
            while q.get() is not None:
                count += 1
    finally:
        done.set()
        proc.join(30)
    return batch(count, sw.elapsed_s)


def _throughput_worker(handle: Any, spec: EntrySpec, seconds: float, seed: int, out: Any) -> None:
    torch.set_num_threads(1)
    pool = KVCachePool.attach(handle)
    rng = random.Random(seed)
    entry = fill_entry(spec.empty_entry(), seed)
    buf = spec.empty_entry()
    ops = 0
    keys = pool.capacity or 1
    deadline = now() + seconds
    while now() < deadline:
        key = rng.randrange(keys)
        if rng.random() < 0.5:
            pool.get(key, out=buf)
        else:
            pool.set(key, entry)
        ops += 1
    pool.close()
    out.put(ops)


def shared_throughput(size: str, processes: int, seconds: float) -> Row:
    """Aggregate ops/s of ``processes`` forked workers, 50% get(out=) / 50% set of random keys, on
    one shared pool, each for ``seconds``."""
    spec = SIZES[size]
    pool = KVCachePool(THROUGHPUT_SLOTS, shared=True, entry_spec=spec, name="bench")
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
    finally:
        pool.close()
    return {"size": size, "processes": processes, "seconds": seconds, "ops": total, "ops_per_s": total / seconds}


def scaling_tasks(s: Settings) -> List[Task]:
    """1 vs 2 processes: on one shared pool, and as UniZero collectors (2 in all: 1 process x 2
    threads, 2 processes x 1 thread; every read verified)."""
    tasks = [Task("scaling", "throughput", f"scaling 96KiB {p} process(es)",
                  partial(shared_throughput, "96KiB", p, s.scaling_seconds)) for p in (1, 2)]
    tasks += [Task("scaling", "trace", f"scaling trace {p}p x {t}t",
                   partial(run_ours_processes, 25, s.scaling_steps, p, t, "rw", True, SCALING_SHARED_KEYS))
              for p, t in ((1, 2), (2, 1))]
    return tasks


def summarize_scaling(scaling: Dict[str, Rows]) -> None:
    """2 processes against 1, for the throughput and the trace."""
    if not scaling:
        return
    rows = []
    for name, rate in (("throughput", "ops_per_s"), ("trace", "env_steps_per_s")):
        by_procs = {r["processes"]: r[rate] for r in scaling.get(name, [])}
        if 1 in by_procs and 2 in by_procs:
            rows.append({"measure": name, "one_process": by_procs[1], "two_processes": by_procs[2],
                         "x": by_procs[2] / by_procs[1]})
    scaling["ratios"] = rows
