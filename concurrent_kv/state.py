"""A pool's metadata, in process memory or in a shared-memory segment.

Both kinds satisfy :class:`PoolState`: an index (key -> slot), per-slot arrays (``slot_key``,
``slot_state``), a free-slot stack, a pin table, the pool's scalar cells (``scalars``), counters
and the eviction policy. :class:`LocalState` builds them from plain Python lists and a dict
(fastest from Python); :class:`SharedState` lays the same structures out as fixed arrays in one
segment (:mod:`concurrent_kv.shm`), described once by :class:`MetaLayout`, viewed through
``memoryview`` casts for scalar access and numpy for sweeps, so several processes see one pool.

Per-slot arrays are the source of truth; the index, the free stack and the policy's links are
derived from them, so a process killed halfway through a change can be repaired by rebuilding
(:meth:`concurrent_kv.slots.SlotTable.rebuild`).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Protocol, Tuple, Type, Union

import numpy as np

from .cells import Cells, CountingArrays
from .entry import EntrySpec
from .eviction import EvictionPolicy
from .shm import Segment, pid_alive, start_time
from .stats import COUNTERS, EVICTIONS, HITS, INSERTS, MISSES, UPDATES, CacheStats, StatsSnapshot

__all__ = [
    "FREE", "WRITING", "READY", "RETIRED", "PoolState", "KeyIndex", "SlotStack", "PinTable",
    "LocalState", "SharedState", "MetaLayout", "ShmIndex", "ArrayStack", "DESCRIPTION_BYTES",
]

# Slot states (the per-slot truth).
FREE, WRITING, READY, RETIRED = 0, 1, 2, 3

# The pool's scalar cells (``state.scalars``): the mark of a change in progress (the pid of
# the process making it, 0 when none), lifetime totals, and housekeeping.
DIRTY, RETIRED_COUNT, INSERTED, EVICTED, REMOVED, LAST_REAP_NS, WORKER_ROWS, FREE_COUNT = range(8)
SCALAR_CELLS = 8


class KeyIndex(Protocol):
    """key -> slot: a dict in process memory, :class:`ShmIndex` in shared memory."""

    def get(self, key: int, /) -> Optional[int]: ...

    def __setitem__(self, key: int, slot: int, /) -> None: ...

    def __delitem__(self, key: int, /) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...

    def clear(self) -> None: ...

    def items(self) -> Iterable[Tuple[int, int]]: ...

    def values(self) -> Iterable[int]: ...


class SlotStack(Protocol):
    """The free slots: a list in process memory, :class:`ArrayStack` in shared memory."""

    def append(self, slot: int, /) -> None: ...

    def pop(self) -> int: ...

    def clear(self) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...


class PinTable:
    """Pin counts per slot, one row per worker process; a process writes only its own row."""

    def __init__(self, rows: List[Cells], scalars: Cells, own: int) -> None:
        self._rows = rows
        self._scalars = scalars
        self.own = rows[own]

    def total(self, slot: int) -> int:
        rows = self._rows
        if len(rows) == 1:
            return rows[0][slot]
        return sum(rows[w][slot] for w in range(max(1, self._scalars[WORKER_ROWS])))

    __getitem__ = total  # the policies' is_pinned(slot)


class HoldTable:
    """Which holders (collectors) hold which slots, and who the holders are.

    A holder keeps the entries it stored from eviction and from other holders' releases; an
    entry goes when its last holder lets go (vLLM's block ``ref_cnt``, SGLang's ``lock_ref``).
    ``rows[h][slot]`` is 1 when holder ``h`` holds ``slot`` (the truth); ``count[slot]`` is the
    number of holders, derived from the rows so that eviction checks it in O(1). A holder is
    registered to a process (``pid`` and its start time), so a dead process's holds are found.
    """

    def __init__(self, rows: List[Optional[Cells]], count: Cells, pid: Cells, started: Cells) -> None:
        self.rows, self.count, self.pid, self.started = rows, count, pid, started

    def holders_of(self, slot: int) -> List[int]:
        return [h for h, row in enumerate(self.rows) if row is not None and row[slot]]

    def row(self, holder: int) -> Cells:
        row = self.rows[holder]
        assert row is not None, "a claimed holder has a row"
        return row

    def claim(self, me: int, started: int) -> int:
        """A free holder row for process ``me``; raises RuntimeError when all are taken."""
        for h in range(len(self.rows)):
            if self.pid[h] == 0:
                self.pid[h], self.started[h] = me, started
                if self.rows[h] is None:  # process memory: rows are made when first claimed
                    self.rows[h] = [0] * len(self.count)
                return h
        raise RuntimeError(f"all {len(self.rows)} holder rows of this pool are taken")

    def dead(self) -> List[int]:
        """Holders whose process is gone (their holds are to be released)."""
        return [h for h in range(len(self.rows)) if self.pid[h] and not pid_alive(self.pid[h], self.started[h])]


class PoolState(Protocol):
    """What the slot table and the pool read and change; see :class:`LocalState`."""

    shared: bool
    capacity: int
    index: KeyIndex
    slot_key: Cells
    slot_state: Cells
    free: SlotStack
    scalars: Cells
    pins: PinTable
    holds: HoldTable
    stats: CacheStats
    policy: EvictionPolicy

    def reap_dead_workers(self) -> List[int]: ...

    def close(self) -> None: ...


class LocalState:
    """Metadata in process memory: a dict index and lists."""

    shared = False

    def __init__(self, capacity: int, policy_cls: Type[EvictionPolicy], max_holders: int = 64) -> None:
        self.capacity = capacity
        index: Dict[int, int] = {}
        self.index: KeyIndex = index
        self.slot_key: Cells = [0] * capacity
        self.slot_state: Cells = [FREE] * capacity
        self.free: SlotStack = list(range(capacity - 1, -1, -1))  # a stack; slot 0 is used first
        self.scalars: Cells = [0] * SCALAR_CELLS
        self.scalars[WORKER_ROWS] = 1
        self.pins = PinTable([[0] * capacity], self.scalars, 0)
        self.holds = HoldTable([None] * max_holders, [0] * capacity, [0] * max_holders, [0] * max_holders)
        self.stats = CacheStats()
        self.policy = policy_cls(capacity)

    def reap_dead_workers(self) -> List[int]:
        return []  # one process: no other worker can die

    def close(self) -> None:
        pass


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

    @staticmethod
    def buckets(capacity: int) -> int:
        """Table size for ``capacity`` slots: a power of two >= 2x capacity (short probe runs)."""
        return 1 << max(3, (2 * capacity - 1).bit_length())

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
        self.counters = own  # type: ignore[assignment]  # a memoryview row: a sequence of ints

    hits = property(lambda self: int(self._rows[:, HITS].sum()))
    misses = property(lambda self: int(self._rows[:, MISSES].sum()))
    evictions = property(lambda self: int(self._rows[:, EVICTIONS].sum()))
    inserts = property(lambda self: int(self._rows[:, INSERTS].sum()))
    updates = property(lambda self: int(self._rows[:, UPDATES].sum()))

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(*(int(x) for x in self._rows.sum(axis=0)))

    def reset(self) -> None:
        self._rows[:] = 0

    def detach(self) -> None:
        """Keep the last counts as a private copy (the segment is about to be unmapped)."""
        self._rows = self._rows.copy()
        self.counters = [0] * len(COUNTERS)


CELL = 8  # every metadata cell is 8 bytes: int64, uint64 (keys) or float64 (priorities)
#: Bytes at the start of a meta segment's payload that describe the pool (JSON, NUL-padded).
DESCRIPTION_BYTES = 1024


@dataclass(frozen=True)
class Region:
    """``count`` cells of format ``fmt`` at byte ``offset`` of a meta segment's payload."""

    offset: int
    count: int
    fmt: str

    @property
    def nbytes(self) -> int:
        return CELL * self.count


class MetaLayout:
    """Where every structure of a shared pool's metadata lies in its segment: the one place
    offsets and sizes are computed. In order: description | scalars | index count | slot_key (u64)
    | slot_state | free stack | token sizes | hash table | worker pids | worker start times | pins
    (a row per worker) | stats (a row per worker) | hold counts | holder pids and start times |
    holds (a row per holder; as many holders as workers) | the policy's arrays (handed out in the
    order the policy asks for them, so every process finds the same).

    The *description* (:data:`DESCRIPTION_BYTES`, written once by the creator) says in plain JSON
    what the layout was made from, so a segment can be read without its handle (``shm list``).
    ``policy`` may be a name only (a policy this process does not know): the layout then stops
    before the policy's arrays, which come last, so every other region is still found."""

    def __init__(self, capacity: int, policy: Union[Type[EvictionPolicy], str], spec: EntrySpec,
                 max_workers: int) -> None:
        self.capacity, self.max_workers = capacity, max_workers
        self.block_shape, self.dtype = spec.block_shape, spec.dtype
        policy_cells = 0
        if isinstance(policy, str):
            self.policy = policy
        else:
            self.policy = policy.name
            counting = CountingArrays()
            policy(capacity, counting)  # what the policy allocates, as it will in the segment
            policy_cells = counting.cells
        parts = [
            ("description", DESCRIPTION_BYTES // CELL, "B"),
            ("scalars", SCALAR_CELLS, "q"),
            ("index_count", 1, "q"),
            ("slot_key", capacity, "Q"),
            ("slot_state", capacity, "q"),
            ("free", capacity, "q"),
            ("sizes", capacity * 2 * spec.num_layers, "q"),
            ("table", ShmIndex.buckets(capacity), "q"),
            ("worker_pid", max_workers, "q"),
            ("worker_start", max_workers, "q"),
            ("pins", max_workers * capacity, "q"),
            ("stats", max_workers * len(COUNTERS), "q"),
            ("hold_count", capacity, "q"),
            ("holder_pid", max_workers, "q"),
            ("holder_start", max_workers, "q"),
            ("holds", max_workers * capacity, "q"),
            ("policy", policy_cells, "q"),
        ]
        self.regions: Dict[str, Region] = {}
        offset = 0
        for name, count, fmt in parts:
            self.regions[name] = Region(offset, count, fmt)
            offset += CELL * count
        self.payload_bytes = offset

    def digest(self) -> bytes:
        """The layout, as the segment header records it for ``attach`` to check."""
        text = f"meta|{self.capacity}|{self.policy}|{self.block_shape}|{self.dtype}|{self.max_workers}"
        return hashlib.sha256(text.encode()).digest()

    @staticmethod
    def data_digest(capacity: int, spec: EntrySpec) -> bytes:
        """The data segment's layout (the slot tensor's shape and dtype)."""
        return hashlib.sha256(f"data|{capacity}|{spec.block_shape}|{spec.dtype}".encode()).digest()


class SharedState:
    """The same metadata as :class:`LocalState`, laid out in one shared segment (see
    :class:`MetaLayout`). A process becomes a worker of the pool by claiming a worker row
    (:meth:`claim_worker`): its pins and counters go to that row only."""

    shared = True

    def __init__(self, seg: Segment, layout: MetaLayout, policy_cls: Type[EvictionPolicy], create: bool) -> None:
        self.segment = seg
        self.capacity = capacity = layout.capacity
        self.max_workers = max_workers = layout.max_workers
        regions = layout.regions

        def cells(name: str, start: int = 0, count: Optional[int] = None) -> Cells:
            region = regions[name]
            n = region.count - start if count is None else count
            view: Cells = seg.view(region.offset + CELL * start, CELL * n, region.fmt)
            return view

        self.scalars = cells("scalars")
        self.slot_key = cells("slot_key")
        self.slot_state = cells("slot_state")
        self.sizes = cells("sizes")
        self.free: SlotStack = ArrayStack(cells("free"), self.scalars, FREE_COUNT)
        self.index: KeyIndex = ShmIndex(cells("table"), self.slot_key, cells("index_count"), 0)
        self.worker_pid = cells("worker_pid")
        self.worker_start = cells("worker_start")
        n_stats = len(COUNTERS)
        self._pins_np = seg.array(regions["pins"].offset, max_workers * capacity).reshape(max_workers, capacity)
        self._stats_np = seg.array(regions["stats"].offset, max_workers * n_stats).reshape(max_workers, n_stats)
        self._pin_rows = [cells("pins", w * capacity, capacity) for w in range(max_workers)]
        self._stat_rows = [cells("stats", w * n_stats, n_stats) for w in range(max_workers)]
        self.holds = HoldTable([cells("holds", h * capacity, capacity) for h in range(max_workers)],  # type: ignore[arg-type]
                               cells("hold_count"), cells("holder_pid"), cells("holder_start"))
        cursor = [0]

        def arrays(length: int, fill: Union[int, float], kind: str) -> Cells:
            region = regions["policy"]
            start = cursor[0]
            cursor[0] += length
            view: Cells = seg.view(region.offset + CELL * start, CELL * length, "d" if kind == "f" else "q")
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
        self.stats: CacheStats

    # -- worker rows ---------------------------------------------------------------------

    def claim_worker(self) -> bool:
        """Take a worker row for this process (caller holds the pool's exclusive lock); return
        whether it was a dead worker's, whose pins were just dropped (its slots need a sweep)."""
        me = os.getpid()
        start = start_time(me)
        for w in range(self.max_workers):
            pid = self.worker_pid[w]
            if pid == 0 or not pid_alive(pid, self.worker_start[w]):
                self.worker_pid[w] = me
                self.worker_start[w] = start
                self._pins_np[w] = 0  # a dead worker's pins: reclaimed
                self.scalars[WORKER_ROWS] = max(self.scalars[WORKER_ROWS], w + 1)
                self.worker = w
                self.pins = PinTable(self._pin_rows, self.scalars, w)
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
        for w in range(self.scalars[WORKER_ROWS]):
            pid = self.worker_pid[w]
            if pid and not pid_alive(pid, self.worker_start[w]):
                self._pins_np[w] = 0
                self.worker_pid[w] = 0
                dead.append(pid)
        self.scalars[LAST_REAP_NS] = time.monotonic_ns()
        return dead

    def close(self) -> None:
        """Unmap the segment (the owner also unlinks it). Statistics stay readable, as a copy."""
        stats = getattr(self, "stats", None)
        if isinstance(stats, SharedStats):
            stats.detach()
        self._pins_np = self._stats_np = None  # type: ignore[assignment]
        self.segment.close()
