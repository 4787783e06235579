"""The hitrate section: recur-pool key traces recorded from the workload, replayed through FIFO,
LRU and PRIORITY pools at several capacities, beside Belady's offline optimum."""

from __future__ import annotations

import heapq
from collections import deque
from functools import partial
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from concurrent_kv import EntrySpec, KVCacheManager, KVCachePool
from concurrent_kv import workload as wl
from concurrent_kv.workload import WorkloadConfig

from .names import Prio
from .results import Row, Rows
from .settings import Settings, Task

NOTES = [
    "Hit rates: recur-pool reads of one collector (8 envs, 25 sims), replayed on real pools with tiny entries. "
    "priority (-depth): deepest node evicted first; priority (search, -depth): older searches first, then "
    "deepest. Belady: offline MIN, every write stored, a read miss inserts nothing.",
]

TraceOp = Tuple[Any, ...]  # ("get", key) | ("set", key, depth, search) | ("clear",)
TINY = EntrySpec(1, 1, 1, 1, 1)
PRIORITIES: Dict[str, Callable[[TraceOp], float]] = {
    Prio.DEPTH: lambda op: -float(op[2]),
    Prio.SEARCH_DEPTH: lambda op: op[3] * 1000.0 - op[2],
}
POLICY_COLUMNS = ("fifo", "lru", *PRIORITIES, "belady")


class RecordingBackend:
    """A workload backend that forwards to a manager and logs the recur pool's reads, writes and
    clears. A write's depth is its parent's + 1 (the workload writes each env's child in the
    order the envs were read), roots have depth 0; the search number is the env step."""

    def __init__(self, manager: KVCacheManager) -> None:
        self._m = manager
        self.trace: List[TraceOp] = []
        self._depth: Dict[int, int] = {}
        self._parents: Deque[int] = deque()
        self._search = 0

    def get_init_cache(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        return self._m.get_init_cache(env_id, cache_key, out)

    def set_init_cache(self, env_id: int, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        self._depth[cache_key] = 0
        return self._m.set_init_cache(env_id, cache_key, kv_cache, priority)

    def hierarchical_get(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        self._parents.append(cache_key)
        got = self._m.get_init_cache(env_id, cache_key, out)
        if got is None:
            self.trace.append(("get", cache_key))
            got = self._m.get_recur_cache(cache_key, out)
        return got

    def get_recur_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        self.trace.append(("get", cache_key))
        return self._m.get_recur_cache(cache_key, out)

    def set_recur_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        depth = self._depth.get(self._parents.popleft(), 0) + 1
        self._depth[cache_key] = depth
        self.trace.append(("set", cache_key, depth, self._search))
        return self._m.set_recur_cache(cache_key, kv_cache, priority)

    def clear_recur_cache(self) -> None:
        self.trace.append(("clear",))
        self._m.clear_recur_cache()

    def clear_init_caches(self, env_id: Optional[int] = None) -> None:
        self._m.clear_init_caches(env_id)

    def end_search(self) -> None:
        self._search += 1


def record_trace(sims: int, steps: int, recur_clear: str) -> List[TraceOp]:
    """The recur-pool trace of one collector over 8 envs (a pool large enough never to evict)."""
    cfg = WorkloadConfig(env_num=8, collectors=1, num_simulations=sims, steps=steps, recur_clear=recur_clear,
                         num_layers=1, num_heads=1, context_length=1, head_dim=1)
    tiny = KVCacheManager({"num_simulations": sims, "recur_pool_size": sims * 8 * steps + 1}, 8, entry_spec=cfg.spec)
    rec = RecordingBackend(tiny)
    try:
        wl.run_collector(rec, cfg, list(range(8)), 0, on_step=rec.end_search)
    finally:
        tiny.close()
    return rec.trace


def replay(trace: Sequence[TraceOp], capacity: int, policy: str) -> float:
    """Hit rate of the trace's reads on a real pool of ``capacity`` slots (tiny entries)."""
    strategy = "priority" if policy in PRIORITIES else policy
    prio = PRIORITIES.get(policy)
    pool = KVCachePool(capacity, strategy, enable_stats=False, entry_spec=TINY)
    entry, buf = TINY.empty_entry(), TINY.empty_entry()
    hits = gets = 0
    try:
        for op in trace:
            if op[0] == "get":
                gets += 1
                hits += pool.get(op[1], out=buf) is not None
            elif op[0] == "set":
                pool.set(op[1], entry, None if prio is None else prio(op))
            else:
                pool.clear()
    finally:
        pool.close()
    return hits / gets if gets else 0.0


def _next_uses(trace: Sequence[TraceOp]) -> List[int]:
    """Per op, the index of the next read of its key that would hit this copy (``len + 1``: none);
    a later write of the key or a clear ends the copy's usefulness."""
    n = len(trace)
    never = n + 1
    next_use = [never] * n
    upcoming: Dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        op = trace[i]
        if op[0] == "clear":
            upcoming.clear()
            continue
        next_use[i] = upcoming.get(op[1], never)
        if op[0] == "get":
            upcoming[op[1]] = i
        else:
            upcoming.pop(op[1], None)
    return next_use


def belady_hit_rate(trace: Sequence[TraceOp], capacity: int) -> float:
    """Belady's MIN, offline: every write must be stored; when full, evict the entry whose next
    useful read is furthest away; a read that misses inserts nothing, as in the pools."""
    next_use = _next_uses(trace)
    cache: Dict[int, int] = {}
    heap: List[Tuple[int, int]] = []  # (-next use, key), stale items skipped
    hits = gets = 0
    for i, op in enumerate(trace):
        if op[0] == "clear":
            cache.clear()
            heap.clear()
            continue
        key = op[1]
        if op[0] == "get":
            gets += 1
            if key not in cache:
                continue
            hits += 1
        elif key not in cache and len(cache) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                if cache.get(victim) == -neg:
                    del cache[victim]
                    break
        cache[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return hits / gets if gets else 0.0


def measure_hitrates(sims: int, steps: int, recur_clear: str) -> Rows:
    trace = record_trace(sims, steps, recur_clear)
    gets = sum(op[0] == "get" for op in trace)
    base = sims * 8
    rows = []
    for frac in (0.25, 0.5, 1.0, 1.5):
        capacity = max(1, int(base * frac))
        row: Row = {"sims": sims, "recur_clear": recur_clear, "steps": steps, "trace_ops": len(trace),
                    "reads": gets, "capacity_frac": frac, "capacity": capacity}
        for policy in ("fifo", "lru", *PRIORITIES):
            row[policy] = replay(trace, capacity, policy)
        row["belady"] = belady_hit_rate(trace, capacity)
        rows.append(row)
    return rows


def hitrate_tasks(s: Settings) -> List[Task]:
    return [Task("hitrate", "rows", f"hitrate 25 sims recur_clear={mode}",
                 partial(measure_hitrates, 25, s.hitrate_steps, mode)) for mode in ("global", "none")]
