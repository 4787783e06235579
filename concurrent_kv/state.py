"""A pool's metadata, in process memory or in a shared-memory segment.

The pool code is the same for both: it talks to an index (key -> slot), per-slot arrays
(``slot_key``, ``slot_state``), a free-slot stack, a pin table, counters and the eviction policy.
:class:`LocalState` builds them from plain Python lists and a dict (fastest from Python);
:class:`SharedState` lays the same structures out as fixed arrays in one segment
(:mod:`concurrent_kv.shm`), viewed through ``memoryview`` casts for scalar access and numpy for
sweeps, so several processes see one pool.

Per-slot arrays are the source of truth; the index, the free stack and the policy's links are
derived from them, so a process killed halfway through a change can be repaired by rebuilding
(:meth:`KVCachePool._recover`).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type, Union

import numpy as np

from .entry import EntrySpec
from .eviction import Cells, EvictionPolicy
from .shm import Segment, pid_alive, start_time
from .stats import HITS, EVICTIONS, INSERTS, MISSES, UPDATES, CacheStats, StatsSnapshot

__all__ = ["FREE", "WRITING", "READY", "RETIRED", "LocalState", "SharedState", "ShmIndex", "ArrayStack"]

# Slot states (the per-slot truth).
FREE, WRITING, READY, RETIRED = 0, 1, 2, 3

# Cells of the ``life`` counter array.
DIRTY, RETIRED_COUNT, INSERTED, EVICTED, REMOVED, LAST_REAP_NS, WORKER_ROWS, FREE_COUNT = range(8)
LIFE_CELLS = 8

_STAT_FIELDS = 5


class PinTable:
    """Pin counts per slot, one row per worker process; a process writes only its own row."""

    def __init__(self, rows: List[Cells], life: Cells, own: int) -> None:
        self._rows = rows
        self._life = life
        self.own = rows[own]
        self.own_index = own

    def total(self, slot: int) -> int:
        rows = self._rows
        if len(rows) == 1:
            return rows[0][slot]
        return sum(rows[w][slot] for w in range(max(1, self._life[WORKER_ROWS])))

    __getitem__ = total  # the policies' is_pinned(slot)

    def row(self, worker: int) -> Cells:
        return self._rows[worker]


class ArrayStack:
    """A stack of slot numbers in a fixed array with its size in a counter cell."""

    def __init__(self, items: Cells, counter: Cells, cell: int) -> None:
        self._items, self._counter, self._cell = items, counter, cell

    def append(self, slot: int) -> None:
        n = self._counter[self._cell]
        self._items[n] = slot
        self._counter[self._cell] = n + 1

    def pop(self) -> int:
        n = self._counter[self._cell] - 1
        self._counter[self._cell] = n
        return self._items[n]

    def clear(self) -> None:
        self._counter[self._cell] = 0

    def __len__(self) -> int:
        return self._counter[self._cell]

    def __iter__(self) -> Iterator[int]:
        return iter([self._items[i] for i in range(len(self))])


_FIB = 11400714819323198485  # 2**64 / golden ratio: Fibonacci hashing spreads small ints too
_MASK64 = (1 << 64) - 1


class ShmIndex:
    """An open-addressing hash table key -> slot in shared memory (linear probing, deletion by
    backward shift so no tombstones pile up). A bucket stores ``slot + 1`` (0 = empty); the key
    itself is read from ``slot_key``, so the table and the slots cannot disagree on keys."""

    def __init__(self, table: Cells, slot_key: Cells, counter: Cells, cell: int) -> None:
        self._t = table
        self._keys = slot_key
        self._counter, self._cell = counter, cell
        size = len(table)
        self._mask = size - 1
        self._shift = 64 - (size.bit_length() - 1)

    def _home(self, key: int) -> int:
        return ((key * _FIB) & _MASK64) >> self._shift

    def _find(self, key: int) -> Tuple[int, int]:
        t, keys, mask = self._t, self._keys, self._mask
        i = self._home(key)
        while True:
            v = t[i]
            if v == 0:
                return i, -1
            if keys[v - 1] == key:
                return i, v - 1
            i = (i + 1) & mask

    def get(self, key: int, default: Optional[int] = None) -> Optional[int]:
        slot = self._find(key)[1]
        return default if slot < 0 else slot

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and self._find(key)[1] >= 0

    def __setitem__(self, key: int, slot: int) -> None:
        """Requires ``slot_key[slot] == key`` already."""
        i, old = self._find(key)
        self._t[i] = slot + 1
        if old < 0:
            self._counter[self._cell] += 1

    def __delitem__(self, key: int) -> None:
        t, keys, mask = self._t, self._keys, self._mask
        i, slot = self._find(key)
        if slot < 0:
            raise KeyError(key)
        t[i] = 0
        self._counter[self._cell] -= 1
        j = i
        while True:  # shift back the rest of the cluster so every key stays reachable
            j = (j + 1) & mask
            v = t[j]
            if v == 0:
                return
            h = self._home(keys[v - 1])
            if (i < j and (h <= i or h > j)) or (i > j and h <= i and h > j):
                t[i] = v
                t[j] = 0
                i = j

    def pop(self, key: int, default: Optional[int] = None) -> Optional[int]:
        slot = self.get(key)
        if slot is None:
            return default
        del self[key]
        return slot

    def clear(self) -> None:
        t = self._t
        for i in range(len(t)):
            t[i] = 0
        self._counter[self._cell] = 0

    def __len__(self) -> int:
        return self._counter[self._cell]

    def items(self) -> List[Tuple[int, int]]:
        return [(self._keys[v - 1], v - 1) for v in self._t if v]

    def values(self) -> List[int]:
        return [v - 1 for v in self._t if v]

    def __iter__(self) -> Iterator[int]:
        return iter([k for k, _ in self.items()])


class SharedStats(CacheStats):
    """``CacheStats`` over one counter row per worker process: this process increments its own
    row (``counters``), readers see the sum of every row, so no increment is lost across
    processes."""

    __slots__ = ("_rows",)

    def __init__(self, rows: np.ndarray, own: Cells) -> None:
        self._rows = rows
        self.counters = own

    hits = property(lambda self: int(self._rows[:, HITS].sum()))
    misses = property(lambda self: int(self._rows[:, MISSES].sum()))
    evictions = property(lambda self: int(self._rows[:, EVICTIONS].sum()))
    inserts = property(lambda self: int(self._rows[:, INSERTS].sum()))
    updates = property(lambda self: int(self._rows[:, UPDATES].sum()))

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(*(int(x) for x in self._rows.sum(axis=0)))

    def reset(self) -> None:
        self._rows[:] = 0


class LocalState:
    """Metadata in process memory: a dict index and lists."""

    shared = False

    def __init__(self, capacity: int, policy_cls: Type[EvictionPolicy], spec: Optional[EntrySpec] = None) -> None:
        self.capacity = capacity
        self.index: Any = {}
        self.slot_key: Cells = [0] * capacity
        self.slot_state: Cells = [FREE] * capacity
        self.free: Any = list(range(capacity - 1, -1, -1))  # a stack; slot 0 is used first
        self.life: Cells = [0] * LIFE_CELLS
        self.life[WORKER_ROWS] = 1
        self.pins = PinTable([[0] * capacity], self.life, 0)
        self.stats: Any = CacheStats()
        self.policy = policy_cls(capacity)

    def close(self) -> None:
        pass


def _cells(n: int) -> int:
    return 8 * n


class SharedState:
    """The same metadata as :class:`LocalState`, laid out in one shared segment.

    Layout (8-byte cells): life counters | slot_key (u64) | slot_state | free stack | token
    sizes | hash table | worker pids | worker start times | pins (row per worker) | stats (row
    per worker) | policy arrays (handed out in a fixed order, so every process finds the same).
    """

    shared = True

    def __init__(self, seg: Segment, capacity: int, policy_cls: Type[EvictionPolicy], spec: EntrySpec,
                 max_workers: int, create: bool) -> None:
        self.segment = seg
        self.capacity = capacity
        self.max_workers = max_workers
        layout = self.layout(capacity, spec, max_workers)
        views: Dict[str, memoryview] = {}
        for name, (offset, count, fmt) in layout.items():
            views[name] = seg.view(offset, _cells(count), fmt)
        self._views = views
        self.life = views["life"]
        self.slot_key = views["slot_key"]
        self.slot_state = views["slot_state"]
        self.sizes = views["sizes"]
        self.free = ArrayStack(views["free"], self.life, FREE_COUNT)
        self.index = ShmIndex(views["table"], self.slot_key, views["index_count"], 0)
        self.worker_pid = views["worker_pid"]
        self.worker_start = views["worker_start"]
        self._pins_np = np.frombuffer(seg.buffer, dtype=np.int64, count=max_workers * capacity,
                                      offset=64 + layout["pins"][0]).reshape(max_workers, capacity)
        self._stats_np = np.frombuffer(seg.buffer, dtype=np.int64, count=max_workers * _STAT_FIELDS,
                                       offset=64 + layout["stats"][0]).reshape(max_workers, _STAT_FIELDS)
        pins_at, stats_at, policy_at = layout["pins"][0], layout["stats"][0], layout["policy"][0]
        self._pin_rows = [seg.view(pins_at + _cells(w * capacity), _cells(capacity), "q") for w in range(max_workers)]
        self._stat_rows = [
            seg.view(stats_at + _cells(w * _STAT_FIELDS), _cells(_STAT_FIELDS), "q") for w in range(max_workers)
        ]
        cursor = [0]

        def arrays(length: int, fill: Union[int, float], kind: str) -> Cells:
            start = cursor[0]
            cursor[0] += length
            view: Cells = seg.view(policy_at + _cells(start), _cells(length), "d" if kind == "f" else "q")
            if create:
                for i in range(length):
                    view[i] = fill
            return view

        self.policy = policy_cls(capacity, arrays)
        if create:
            for i in range(capacity):
                self.free.append(capacity - 1 - i)
        self.worker: Optional[int] = None
        self.pins: PinTable
        self.stats: Any

    @staticmethod
    def layout(capacity: int, spec: EntrySpec, max_workers: int) -> Dict[str, Tuple[int, int, str]]:
        table = 1 << max(3, (2 * capacity - 1).bit_length())  # >= 2x capacity: short probe runs
        parts = [
            ("life", LIFE_CELLS, "q"),
            ("index_count", 1, "q"),
            ("slot_key", capacity, "Q"),
            ("slot_state", capacity, "q"),
            ("free", capacity, "q"),
            ("sizes", capacity * 2 * spec.num_layers, "q"),
            ("table", table, "q"),
            ("worker_pid", max_workers, "q"),
            ("worker_start", max_workers, "q"),
            ("pins", max_workers * capacity, "q"),
            ("stats", max_workers * _STAT_FIELDS, "q"),
            ("policy", 6 * capacity + 16, "q"),
        ]
        out, offset = {}, 0
        for name, count, fmt in parts:
            out[name] = (offset, count, fmt)
            offset += _cells(count)
        return out

    @classmethod
    def payload_bytes(cls, capacity: int, spec: EntrySpec, max_workers: int) -> int:
        return sum(_cells(count) for _, count, _ in cls.layout(capacity, spec, max_workers).values())

    @staticmethod
    def digest(capacity: int, policy: str, spec: EntrySpec, max_workers: int) -> bytes:
        """The meta segment's layout, as its header records it for ``attach`` to check."""
        text = f"meta|{capacity}|{policy}|{spec.block_shape}|{spec.dtype}|{max_workers}"
        return hashlib.sha256(text.encode()).digest()

    @staticmethod
    def data_digest(capacity: int, spec: EntrySpec) -> bytes:
        """The data segment's layout (the slot tensor's shape and dtype)."""
        return hashlib.sha256(f"data|{capacity}|{spec.block_shape}|{spec.dtype}".encode()).digest()

    # -- worker rows ---------------------------------------------------------------------

    def claim_worker(self) -> bool:
        """Take a worker row for this process (caller holds the pool's exclusive lock); return
        whether it was a dead worker's, whose pins were just dropped (its slots need a sweep)."""
        me = os.getpid()
        start = start_time(me)
        for w in range(self.max_workers):
            pid = self.worker_pid[w]
            if pid == 0 or not pid_alive(pid, self.worker_start[w]):
                if pid != 0:
                    self._pins_np[w] = 0  # a dead worker's pins: reclaimed
                self.worker_pid[w] = me
                self.worker_start[w] = start
                self._pins_np[w] = 0
                self.life[WORKER_ROWS] = max(self.life[WORKER_ROWS], w + 1)
                self.worker = w
                self.pins = PinTable(self._pin_rows, self.life, w)
                self.stats = SharedStats(self._stats_np, self._stat_rows[w])
                return pid != 0
        raise RuntimeError(f"all {self.max_workers} worker rows of this pool are taken by live processes")

    def release_worker(self) -> None:
        if self.worker is not None:
            self._pins_np[self.worker] = 0
            self.worker_pid[self.worker] = 0
            self.worker = None

    def reap_dead_workers(self) -> List[int]:
        """Clear the pins of workers whose process is gone; return their pids."""
        dead = []
        for w in range(self.life[WORKER_ROWS]):
            pid = self.worker_pid[w]
            if pid and not pid_alive(pid, self.worker_start[w]):
                self._pins_np[w] = 0
                self.worker_pid[w] = 0
                dead.append(pid)
        self.life[LAST_REAP_NS] = time.monotonic_ns()
        return dead

    def close(self) -> None:
        """Unmap the segment (the owner also unlinks it). Statistics stay readable, as a copy."""
        stats = getattr(self, "stats", None)
        if isinstance(stats, SharedStats):
            stats._rows = stats._rows.copy()
            stats.counters = [0] * _STAT_FIELDS
        self._pins_np = self._stats_np = None  # type: ignore[assignment]
        self.segment.close()
