"""The memory section: bytes per entry and per slot, metadata per slot, and allocations per
operation in steady state (tracemalloc, and tensor storages counted by a TorchDispatchMode)."""

from __future__ import annotations

import itertools
import os
import tracemalloc
from functools import partial
from typing import Any, Callable, Iterator, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .fixtures import fill_pool, filled, make_bench_manager, make_pool
from .names import Op
from .results import Row, Rows
from .settings import HOT, MISS_KEY, SIZES, Settings, Task

NOTES = [
    "Allocations: tensor storages are counted gross (every aten output whose storage is not an input's, via "
    "TorchDispatchMode); Python heap growth is tracemalloc's block count after a second phase minus after a "
    "first phase of n calls, divided by n. Transient Python objects (tuples, lock holders) are not counted.",
]

#: The operations the goals hold to zero allocations per call.
ZERO_ALLOCATION_OPS = (Op.GET_OUT, Op.SET, Op.LEASE)


def measure_footprint(size: str, backend: str, slots: int) -> Row:
    """Bytes per entry and slot storage; metadata bytes per slot. In-process: the Python heap
    (tracemalloc) grown by building the pool with ``entry_spec`` and filling every slot with a
    64-bit key; torch's storage allocation is not on the Python heap, so tracemalloc sees none of
    it (nor the C++ side of the per-slot view tensors). Shared: the meta segment's size / slots."""
    spec = SIZES[size]
    entry = spec.empty_entry()
    row: Row = {"size": size, "backend": backend, "slots": slots, "entry_bytes": spec.nbytes}
    if backend == "shared":
        pool = make_pool(spec, "fifo", "shared", slots)
        try:
            fill_pool(pool, entry, slots)
            meta = os.path.getsize(pool.handle().meta_path)
            return {**row, "storage_bytes": pool.nbytes, "metadata_bytes": meta, "metadata_per_slot": meta / slots,
                    "how": "meta segment size / slots (max_workers=64 rows included)"}
        finally:
            pool.close()
    keys_source = itertools.count(2**62)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pool = make_pool(spec, "fifo", backend, slots)
        for _ in range(slots):
            pool.set(next(keys_source), entry)
        meta = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    row.update({"storage_bytes": pool.nbytes, "metadata_bytes": meta, "metadata_per_slot": meta / slots,
                "how": "tracemalloc: Python heap after construction + filling, incl. 64-bit keys"})
    pool.close()
    return row


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class StorageCounter(TorchDispatchMode):
    """Counts aten calls and the tensor storages they create (an output whose storage is not an
    input's). A ``TorchDispatchMode`` sees every tensor op, methods and in-place ops included."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.storages = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.numel()}
        for t in _tensors(out):
            if t.numel() and t.untyped_storage().data_ptr() not in inputs:
                self.storages += 1
        return out


def alloc_ops(size: str, backend: str, slots: int) -> Tuple[List[Tuple[str, Callable[[], object]]], Callable[[], None]]:
    """The operations whose steady-state allocations are counted, and a closer."""
    spec = SIZES[size]
    entry = filled(size, HOT)
    buf = spec.empty_entry()
    pool = make_pool(spec, "fifo", backend, slots)
    manager = make_bench_manager(spec, "fifo", backend, slots)
    fill_pool(pool, entry, slots)
    fill_pool(manager.recur_pool, entry, slots)
    fresh = itertools.count(10**9)

    def lease() -> None:
        with pool.lease(HOT) as kv:
            assert kv is not None

    ops: List[Tuple[str, Callable[[], object]]] = [
        (Op.GET_OUT, lambda: pool.get(HOT, out=buf)),
        (Op.SET, lambda: pool.set(HOT, entry)),
        (Op.LEASE, lease),
        (Op.MISS, lambda: pool.get(MISS_KEY)),
        (Op.HIERARCHICAL, lambda: manager.hierarchical_get(0, HOT, out=buf)),
        (Op.GET_NEW_CONTROL, lambda: pool.get(HOT)),
        (Op.SET_EVICTING, lambda: pool.set(next(fresh), entry)),  # last: evicts HOT
    ]

    def close() -> None:
        pool.close()
        manager.close()

    return ops, close


def _traced_blocks() -> int:
    snap = tracemalloc.take_snapshot()
    count = sum(stat.count for stat in snap.statistics("filename"))
    del snap
    return count


def measure_allocations(size: str, backend: str, slots: int, n: int) -> Rows:
    """Per operation, in steady state: Python heap growth (tracemalloc blocks still allocated,
    counted after a first phase of ``n`` calls and again after a second phase of ``n`` calls; their
    difference / ``n``, so what the pool legitimately keeps, e.g. the keys it holds, cancels out),
    the peak of transient Python allocation, and -- gross, every call counted -- tensor storages
    created and aten calls per operation (dispatch mode, over ``min(n, 2000)`` calls).
    ``get (new entry)`` is the control: it must show one storage per call."""
    ops, close = alloc_ops(size, backend, slots)
    counted = min(n, 2000)
    rows = []
    try:
        for op, fn in ops:
            for _ in range(counted):
                fn()
            tracemalloc.start()
            try:
                for _ in range(n):
                    fn()
                first = _traced_blocks()
                tracemalloc.reset_peak()
                for _ in range(n):
                    fn()
                second = _traced_blocks()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            counter = StorageCounter()
            with counter:
                for _ in range(counted):
                    fn()
            rows.append({"size": size, "backend": backend, "op": op, "ops": n,
                         "net_py_blocks_per_op": (second - first) / n, "py_blocks_after_first_phase": first,
                         "py_blocks_after_second_phase": second, "transient_peak_bytes": peak,
                         "tensor_storages_per_op": counter.storages / counted,
                         "aten_calls_per_op": counter.calls / counted})
    finally:
        close()
    return rows


def memory_tasks(s: Settings) -> List[Task]:
    tasks = []
    for size in s.micro_sizes:
        for backend in s.backends:
            tasks.append(Task("memory", "footprint", f"memory {size} {backend}",
                              partial(measure_footprint, size, backend, s.slots)))
    for backend in s.backends:
        tasks.append(Task("memory", "allocations", f"allocations 96KiB {backend}",
                          partial(measure_allocations, "96KiB", backend, s.slots, s.alloc_ops)))
    return tasks
