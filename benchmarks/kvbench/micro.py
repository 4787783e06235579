"""The micro section: per-call latency of every pool operation, per entry size, policy and
backend, against the physical floor (one ``copy_`` of the same bytes, measured in the same run)."""

from __future__ import annotations

import itertools
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from concurrent_kv.entry import entry_tensors

from .fixtures import fill_pool, filled, foreign, make_bench_manager, make_pool
from .names import Op
from .results import Row, Rows
from .settings import HOT, MISS_KEY, SIZES, Settings, Task
from .timing import latency

NOTES = [
    "Micro: in the full run every measurement (the floor too) is taken in three rounds, at the start, the middle "
    "and the end of the run; the lowest p50 is kept (min of repeats, as timeit advises), all in p50_runs_us.",
    "x floor = p50 / p50 of one copy_ of the same bytes into a preallocated tensor, measured in the same run; "
    "a get that returns a new entry is better compared with the clone row of the floor table; the LightZero-layout "
    "rows (a tensor per K/V cache, as LightZero's own KeysValues) against a copy_ of each of the same tensors.",
]


def measure_floor(size: str, n: int) -> Rows:
    """The physical floor: one ``copy_`` of an entry's bytes into a preallocated tensor, one
    ``clone`` (a copy into a new allocation, the floor of a get that returns a new entry), and
    the ``copy_`` of each tensor of an entry in LightZero's layout (the floor of its get and set)."""
    spec = SIZES[size]
    src = filled(size, 1)._block
    dst = torch.empty_like(src)
    parts = list(zip(entry_tensors(foreign(size, 1))[0], entry_tensors(foreign(size, 2))[0]))

    def copy_parts() -> None:
        for s, d in parts:
            d.copy_(s)

    return [
        {"size": size, "bytes": spec.nbytes, "op": Op.COPY, **latency(lambda: dst.copy_(src), n)},
        {"size": size, "bytes": spec.nbytes, "op": Op.CLONE, **latency(lambda: src.clone(), n)},
        {"size": size, "bytes": spec.nbytes, "op": Op.COPY_PARTS, **latency(copy_parts, n)},
    ]


def measure_pool_ops(size: str, policy: str, backend: str, slots: int, n: int) -> Rows:
    """Every micro operation on one pool (and one manager for hierarchical_get). The evicting set
    runs last: it pushes out the key the hit measurements read."""
    spec = SIZES[size]
    entry = filled(size, HOT)
    buf = spec.empty_entry()
    lightzero_entry, lightzero_buf = foreign(size, HOT), foreign(size, 0)
    pool = make_pool(spec, policy, backend, slots)
    manager = make_bench_manager(spec, policy, backend, slots)
    try:
        fill_pool(pool, entry, slots)
        fill_pool(manager.recur_pool, entry, slots)
        manager.set_init_cache(0, 10**6, entry)  # a root; the measured lookup misses it, as §8 says
        fresh = itertools.count(10**9)

        def lease() -> None:
            with pool.lease(HOT):
                pass

        ops: List[Tuple[str, Callable[[], object]]] = [
            (Op.GET_NEW, lambda: pool.get(HOT)),
            (Op.GET_OUT, lambda: pool.get(HOT, out=buf)),
            (Op.MISS, lambda: pool.get(MISS_KEY)),
            (Op.LEASE, lease),
            (Op.SET, lambda: pool.set(HOT, entry)),
            (Op.HIERARCHICAL, lambda: manager.hierarchical_get(0, HOT, out=buf)),
            (Op.GET_OUT_FOREIGN, lambda: pool.get(HOT, out=lightzero_buf)),
            (Op.SET_FOREIGN, lambda: pool.set(HOT, lightzero_entry)),
            (Op.SET_EVICTING, lambda: pool.set(next(fresh), entry)),
        ]
        rows = []
        for op, fn in ops:
            stats = latency(fn, n)
            if op in (Op.GET_NEW, Op.GET_OUT, Op.LEASE):
                assert HOT in pool, "the measured key must stay resident"
            rows.append({"size": size, "bytes": spec.nbytes, "policy": policy, "backend": backend, "op": op, **stats})
        return rows
    finally:
        pool.close()
        manager.close()


def micro_tasks(s: Settings, round_no: int = 0) -> List[Task]:
    tasks = []
    tag = f" (round {round_no + 1})" if s.micro_repeats > 1 else ""
    for size in s.micro_sizes:
        n = s.calls[size]
        tasks.append(Task("micro", "floor", f"micro {size} floor{tag}", partial(measure_floor, size, n)))
        for policy in s.policies:
            for backend in s.backends:
                tasks.append(Task("micro", "ops", f"micro {size} {policy} {backend}{tag}",
                                  partial(measure_pool_ops, size, policy, backend, s.slots, n)))
    return tasks


def _lowest_p50(rows: Rows, keys: Sequence[str]) -> Rows:
    """One row per measurement: the round with the lowest p50, with every round's p50 listed."""
    best: Dict[Tuple[object, ...], Row] = {}
    runs: Dict[Tuple[object, ...], List[float]] = {}
    for r in rows:
        k = tuple(r[key] for key in keys)
        runs.setdefault(k, []).append(r["p50_us"])
        if k not in best or r["p50_us"] < best[k]["p50_us"]:
            best[k] = r
    return [{**r, "p50_runs_us": runs[k]} for k, r in best.items()]


def summarize_micro(micro: Dict[str, Rows]) -> None:
    """Lowest p50 over the rounds, then ratios to the ``copy_`` floor of the same size (x floor,
    us above floor)."""
    if not micro:
        return
    micro["floor"] = _lowest_p50(micro.get("floor", []), ("size", "op"))
    micro["ops"] = _lowest_p50(micro.get("ops", []), ("size", "policy", "backend", "op"))
    floors = {(r["size"], r["op"]): r["p50_us"] for r in micro["floor"]}
    for r in micro["ops"]:
        f = floors.get((r["size"], Op.COPY_PARTS if r["op"] in Op.FOREIGN else Op.COPY))
        if f:
            r["floor_us"] = f
            r["x_floor"] = r["p50_us"] / f
            r["over_floor_us"] = r["p50_us"] - f
