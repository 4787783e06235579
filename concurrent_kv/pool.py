"""``KVCachePool``: a fixed number of preallocated slots behind a key index, safe under threads
and worker processes.

The pool validates calls, takes locks and copies data; it delegates the rest to its pieces:
metadata (:mod:`concurrent_kv.state`), the slot lifecycle (:mod:`concurrent_kv.slots`), slot
storage (:mod:`concurrent_kv.storage`), a lock (:mod:`concurrent_kv.locks`) and, for
``shared=True``, the shared-memory set-up (:mod:`concurrent_kv.shared`), through which worker
processes attach by handle. ``__init__`` and :meth:`attach` assemble the pieces the same way.

Locking, in two levels:

* the **pool lock** (reader-writer by default) guards slot *contents* and the index: ``get``
  copies out under a shared hold, so readers copy in parallel; ``set``/``delete``/``clear`` hold
  it exclusively, including the copy in, so no reader sees a half-written entry. Shared pools
  add ``flock`` across processes (released by the kernel if a holder dies), and copy a new key's
  entry outside the lock into a slot reserved for it (a *split write*);
* the **metadata lock** (a ``threading.Lock`` held for a few list operations) guards what
  readers and lease exits change under a shared hold: counters, LRU recency, pin counts.

Leases pin a slot: a pinned slot is never evicted nor overwritten. Rewriting a leased key writes
the new value to another slot; deleting or clearing it *retires* the slot, which the next writer
reuses once its pins are gone.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple, Type, Union

import torch

from . import shared as shared_memory
from .batch import PinnedBatch, SizesLike, WriteBatch, check_keys, check_sizes, entries_data
from .cells import Cells
from .checks import boolean, instance_of, positive_int, positive_seconds
from .entry import EntrySpec, KeysValues
from .errors import ClosedError, ConfigError, EntryMismatchError, HolderError, PoolExhaustedError
from .eviction import EvictionPolicy, EvictionStrategy, check_priority, resolve_policy
from .keys import check_key
from .locks import LOCK_KINDS, PoolLock, Releasable, make_lock
from .shared import PoolHandle, SharedParts
from .shm import start_time
from .slots import Occupancy, SlotTable
from .state import LocalState, PoolState
from .stats import HITS, MISSES, CacheStats, StatsSnapshot
from .storage import SlotStorage

__all__ = ["KVCachePool", "Lease", "PoolHandle", "Occupancy", "MAX_SLOTS"]

StrategyLike = Union[EvictionStrategy, str, Type[EvictionPolicy]]
#: The most slots a pool may have. UniZero needs thousands; metadata is allocated up front, so
#: an absurd size must fail here with a clear error, not exhaust the machine's memory.
MAX_SLOTS = 1 << 22


def _copy_pairs(storage: SlotStorage, placed: List[Tuple[int, int]],
                data: List[Any]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(slot, source) tensors that copy the entry data of each (position, slot) into the slot."""
    dst: List[torch.Tensor] = []
    src: List[torch.Tensor] = []
    for i, slot in placed:
        block = data[i]
        if isinstance(block, torch.Tensor):  # a block, a row of a tensor batch, or a block's token prefix
            dst.append(storage.slot(slot, block.shape[3]))
            src.append(block)
        else:  # LightZero's layout: one tensor per cache
            dst += storage.parts(slot)
            src += block
    return dst, src


def _none_in(keys: List[int], index: Any) -> bool:
    for key in keys:
        if key in index:
            return False
    return True


def _check_capacity(capacity: int, what: str) -> int:
    if capacity > MAX_SLOTS:
        raise ConfigError(f"{what} gives {capacity:,} slots; a pool holds at most {MAX_SLOTS:,}")
    return capacity


class Lease:
    """Context manager from :meth:`KVCachePool.lease`: pins the entry on enter, unpins on exit.

    ``__enter__`` returns a zero-copy :class:`KeysValues` over the slot, or ``None`` on a miss.
    Read it, do not write it: its tensors *are* the pool's slot.
    """

    __slots__ = ("_pool", "_key", "_slot")

    def __init__(self, pool: "KVCachePool", key: int) -> None:
        self._pool = pool
        self._key = key
        self._slot: Optional[int] = None

    def __enter__(self) -> Optional[KeysValues]:
        if self._slot is not None:
            raise RuntimeError("a Lease can be entered once")
        self._slot = self._pool._pin(self._key)
        return None if self._slot < 0 else self._pool._storage_view(self._slot)

    def __exit__(self, *exc: object) -> None:
        if self._slot is not None and self._slot >= 0:
            self._pool._unpin(self._slot)
        self._slot = -1


class KVCachePool:
    """A thread-safe pool of KV-cache entries under int keys.

    Give the size as ``pool_size`` (slots) or ``max_bytes`` (slots = max_bytes // entry bytes).
    Slot tensors are allocated once, with the shape, dtype and device of the first entry stored
    (or of ``entry_spec`` at once); later entries must match them. ``shared=True`` puts slots and
    metadata in shared memory (``entry_spec`` required); see :meth:`handle` and :meth:`attach`.
    """

    _state: PoolState
    _slots: SlotTable
    _slot_table_cls: Type[SlotTable] = SlotTable  # a seam for tests that break the state machine on purpose

    def __init__(
        self,
        pool_size: Optional[int] = None,
        eviction_strategy: StrategyLike = EvictionStrategy.FIFO,
        enable_stats: bool = True,
        name: str = "pool",
        *,
        max_bytes: Optional[int] = None,
        entry_spec: Optional[EntrySpec] = None,
        lock: Union[str, Callable[[str], PoolLock]] = "rw",
        lock_timeout: float = 30.0,
        shared: bool = False,
        max_workers: int = 64,
    ) -> None:
        if (pool_size is None) == (max_bytes is None):
            raise ConfigError("give exactly one of pool_size (slots) or max_bytes")
        if pool_size is not None:
            _check_capacity(positive_int("pool_size", pool_size), "pool_size")
        if max_bytes is not None:
            positive_int("max_bytes", max_bytes)
        boolean("enable_stats", enable_stats)
        instance_of("name", name, str)
        if entry_spec is not None:
            instance_of("entry_spec", entry_spec, EntrySpec)
        boolean("shared", shared)
        positive_int("max_workers", max_workers)
        policy_cls = resolve_policy(eviction_strategy)
        timeout = positive_seconds("lock_timeout", lock_timeout)
        self._configure(name, eviction_strategy, policy_cls, enable_stats, timeout, pool_size, max_bytes)
        if shared:
            if entry_spec is None:
                raise ConfigError("a shared pool needs entry_spec (its slots are laid out before any entry)")
            if entry_spec.device.type != "cpu":
                raise ConfigError("a shared pool keeps its slots in host shared memory: entry_spec.device must be cpu")
            if not isinstance(lock, str) or lock not in LOCK_KINDS:
                raise ConfigError(f"a shared pool's lock must be one of {LOCK_KINDS}, got {lock!r}")
            capacity = self._capacity_for(entry_spec)
            self._adopt_shared(shared_memory.create(
                name, capacity, policy_cls, entry_spec, lock, max_workers, timeout, enable_stats))
            return
        self._lock = make_lock(lock, name)
        if pool_size is not None:
            self._adopt_state(LocalState(pool_size, policy_cls))
        if entry_spec is not None:
            self._allocate_storage(entry_spec)

    @classmethod
    def attach(cls, handle: PoolHandle) -> "KVCachePool":
        """The shared pool behind ``handle``, with the same API, in this process."""
        parts = shared_memory.attach(handle)
        pool = cls.__new__(cls)
        try:
            pool._configure(handle.name, handle.policy, resolve_policy(handle.policy), handle.enable_stats,
                            handle.lock_timeout, handle.capacity, None)
            pool._adopt_shared(parts)
        except BaseException:
            parts.close()
            raise
        return pool

    # -- assembly (one path for __init__ and attach) ----------------------------------------

    def _configure(self, name: str, strategy: StrategyLike, policy_cls: Type[EvictionPolicy], enable_stats: bool,
                   timeout: float, capacity: Optional[int], max_bytes: Optional[int]) -> None:
        self.name = name
        self.eviction_strategy = strategy
        self._policy_cls = policy_cls
        self._stats_on = enable_stats
        self._timeout = timeout
        self._capacity: Optional[int] = capacity  # None until the first entry when sized by max_bytes
        self._max_bytes = max_bytes
        self._closed = False
        self._pid = os.getpid()
        self._fault: Optional[Callable[[str], None]] = None  # test hook: called at named points
        self._meta_lock = threading.Lock()
        self._inflight = 0  # this process's split writes copying outside the lock (close waits)
        self._parts: Optional[SharedParts] = None
        self._shared = False
        self._split_writes = False
        self._spec: Optional[EntrySpec] = None
        self._storage: Optional[SlotStorage] = None
        # Until the pool is sized: no slots, so every lookup is a miss counted here.
        self._index: Any = {}
        self._stats: CacheStats = CacheStats()
        self._counters: Cells = self._stats.counters
        self._reads_record = enable_stats  # whether a read must take the metadata lock
        self._touch_on_read = False
        self._read_exclusive = False

    def _adopt_state(self, state: PoolState) -> None:
        """Use ``state`` as the pool's metadata. The hot paths read a few of its structures
        through attributes of the pool (each lookup saved is ~40 ns on a ~2 us call)."""
        self._state = state
        self._capacity = state.capacity
        self._slots = self._slot_table_cls(state, self.name, self._stats_on, self._pid)
        self._index = state.index
        self._policy = state.policy
        # Shared LRU reads reorder links other processes read: they take the lock exclusively.
        self._read_exclusive = state.shared and self._policy.reads_mutate
        self._touch_on_read = self._policy.reads_mutate
        self._reads_record = self._stats_on or self._touch_on_read
        if not state.shared:
            self._adopt_worker_row()

    def _adopt_worker_row(self) -> None:
        """Point the hot paths at this process's pin and counter rows (after joining a shared pool)."""
        self._stats = self._state.stats
        self._counters = self._stats.counters
        self._own_pins = self._state.pins.own

    def _adopt_shared(self, parts: SharedParts) -> None:
        self._parts = parts
        self._shared = True
        self._storage = parts.storage
        self._spec = parts.storage.spec
        self._lock = parts.lock
        # Copy new entries outside the exclusive lock (see _set_split); with a mutex every hold
        # is exclusive anyway, so the extra lock rounds would buy nothing.
        self._split_writes = parts.handle.lock != "mutex"
        self._adopt_state(parts.state)
        self._join()
        shared_memory.track_forks(self)

    def _join(self) -> None:
        assert self._parts is not None
        shared_memory.join(self._parts, self._slots, self._timeout)
        self._adopt_worker_row()

    def _capacity_for(self, spec: EntrySpec) -> int:
        if self._capacity is not None:
            return self._capacity
        assert self._max_bytes is not None
        capacity = _check_capacity(self._max_bytes // spec.nbytes, "max_bytes")
        if capacity == 0:
            raise EntryMismatchError(f"one entry takes {spec.nbytes} bytes, more than max_bytes={self._max_bytes}")
        return capacity

    def _allocate_storage(self, spec: EntrySpec) -> None:
        """Allocate a local pool's slot storage for entries of ``spec`` (once)."""
        if self._capacity is None:
            self._adopt_state(LocalState(self._capacity_for(spec), self._policy_cls))
        assert self._capacity is not None
        try:
            self._storage = SlotStorage(spec, self._capacity)
        except RuntimeError as exc:  # torch could not allocate the slots
            raise EntryMismatchError(
                f"cannot allocate {self._capacity:,} slots of {spec.nbytes:,} bytes on {spec.device}: {exc}"
            ) from None
        self._spec = spec

    def _after_fork(self) -> None:
        """In a forked child: own locks and descriptor, and a worker row of its own, claimed on
        first use (a child that never touches the pool takes none)."""
        if self._closed:
            return
        self._pid = self._slots.pid = os.getpid()
        self._meta_lock = threading.Lock()
        self._inflight = 0
        assert self._parts is not None
        self._parts.lock.reopen_after_fork()
        self._parts.state.worker = None

    def handle(self) -> PoolHandle:
        """A small picklable handle for :meth:`attach` in another process (shared pools only)."""
        self._start_call()
        if self._parts is None:
            raise ConfigError(f"pool {self.name!r} is not shared: create it with shared=True to hand it to workers")
        return self._parts.handle

    # -- properties ----------------------------------------------------------------------

    @property
    def capacity(self) -> Optional[int]:
        """Number of slots (None until the first entry when sized by ``max_bytes``)."""
        return self._capacity

    pool_size = capacity  # LightZero's name

    @property
    def shared(self) -> bool:
        return self._shared

    @property
    def entry_spec(self) -> Optional[EntrySpec]:
        """Shape, dtype and device of the slots (None before the first entry)."""
        return self._spec

    @property
    def nbytes(self) -> int:
        """Bytes of slot storage allocated."""
        return 0 if self._storage is None else self._storage.nbytes

    @property
    def stats(self) -> CacheStats:
        """The live counters (see :meth:`stats_snapshot` for a consistent frozen copy)."""
        return self._stats

    @property
    def closed(self) -> bool:
        return self._closed

    def stats_snapshot(self) -> StatsSnapshot:
        """An immutable, consistent copy of the counters (summed over processes when shared)."""
        with self._meta_lock:
            return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (entries are kept)."""
        self._start_call()
        with self._meta_lock:
            self._stats.reset()

    # -- calls and locking -----------------------------------------------------------------

    def _start_call(self) -> None:
        """Every public call begins here: refuse a closed pool; in a process forked from one
        that used the pool, join it (claim a worker row) before the first call goes on."""
        if self._closed:
            raise ClosedError(f"pool {self.name!r} is closed")
        if self._parts is not None and self._parts.state.worker is None:
            self._join()

    def _acquire(self, write: bool) -> Releasable:
        held = self._lock.acquire_write(self._timeout) if write else self._lock.acquire_read(self._timeout)
        if self._shared and self._slots.dirty:
            # A process died halfway through changing the pool: repair it, then start over.
            held.release()
            held = self._lock.acquire_write(self._timeout)
            try:
                if self._slots.dirty:
                    self._slots.rebuild()
            finally:
                held.release()
            return self._acquire(write)
        return held

    # -- reads ---------------------------------------------------------------------------

    def get(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """A private deep copy of the entry under ``cache_key``, or None on a miss.

        With ``out`` (an entry of the pool's shape), the data is copied into it and ``out`` is
        returned, so steady-state reads allocate no tensor.
        """
        key = check_key(cache_key)
        self._start_call()
        tensors = None if out is None else self._check_out(out)
        if self._capacity is None:
            self._miss_while_unsized()
            return None
        held = self._acquire(self._read_exclusive)
        try:
            slot = self._index.get(key)
            if self._reads_record:
                with self._meta_lock:
                    if slot is None:
                        self._counters[MISSES] += self._stats_on
                        return None
                    self._counters[HITS] += self._stats_on
                    if self._touch_on_read:
                        self._policy.touch(slot)
            elif slot is None:
                return None
            assert self._storage is not None
            return self._storage.read(slot, out, tensors)
        finally:
            held.release()

    def _miss_while_unsized(self) -> None:
        """A lookup in a pool sized by ``max_bytes`` that has no entry yet (no slots at all)."""
        with self._meta_lock:
            self._counters[MISSES] += self._stats_on

    def lease(self, cache_key: int) -> Lease:
        """``with pool.lease(key) as kv:`` a zero-copy view, pinned until the block exits.

        ``kv`` is None on a miss. While pinned, the slot is never evicted or overwritten: a
        ``set`` of the same key stores the new value in another slot.
        """
        key = check_key(cache_key)
        self._start_call()
        return Lease(self, key)

    def _pin(self, key: int) -> int:
        if self._closed:  # lease() checked the rest when the Lease was made
            raise ClosedError(f"pool {self.name!r} is closed")
        if self._capacity is None:
            self._miss_while_unsized()
            return -1
        held = self._acquire(self._read_exclusive)
        try:
            slot = self._index.get(key)
            with self._meta_lock:
                if slot is None:
                    self._counters[MISSES] += self._stats_on
                    return -1
                self._counters[HITS] += self._stats_on
                if self._touch_on_read:
                    self._policy.touch(slot)
                self._own_pins[slot] += 1
                return slot
        finally:
            held.release()

    def _storage_view(self, slot: int) -> KeysValues:
        assert self._storage is not None
        return self._storage.view(slot)

    def _unpin(self, slot: int) -> None:
        # Only this process's pin row changes; a retired slot is reclaimed by the next writer.
        with self._meta_lock:
            self._own_pins[slot] -= 1

    # -- batches (see concurrent_kv.batch) ------------------------------------------------

    def lookup_many(self, cache_keys: Sequence[int]) -> PinnedBatch:
        """Look every key up under one lock acquisition and pin the hits: a :class:`PinnedBatch`
        whose slot tensors can be read without a lock (one gather for the whole batch).

        Hits and misses are counted as ``get`` counts them. Release the batch (or use it as a
        ``with`` block) once its slots are read: a pinned slot is never reused.
        """
        keys = check_keys(cache_keys)
        self._start_call()
        return self._pin_many(keys)

    def _pin_many(self, keys: List[int]) -> PinnedBatch:
        index = self._index
        # An in-process index is a dict: a lock-free look is atomic under the GIL, so a batch
        # that misses entirely (UniZero probes each env's root pool for every search node)
        # needs no lock round trip. A shared index is read under the lock only.
        if self._capacity is None or (not self._shared and _none_in(keys, index)):
            with self._meta_lock:
                self._counters[MISSES] += self._stats_on * len(keys)
            return PinnedBatch(self, keys, [-1] * len(keys), 0, None)
        held = self._acquire(self._read_exclusive)
        try:
            slots = [-1 if s is None else s for s in map(index.get, keys)]
            with self._meta_lock:
                pins, hits = self._own_pins, 0
                for slot in slots:
                    if slot >= 0:
                        pins[slot] += 1
                        hits += 1
                        if self._touch_on_read:
                            self._policy.touch(slot)
                self._counters[HITS] += self._stats_on * hits
                self._counters[MISSES] += self._stats_on * (len(keys) - hits)
            return PinnedBatch(self, keys, slots, hits, self._storage)
        finally:
            held.release()

    def _unpin_many(self, slots: List[int]) -> None:
        with self._meta_lock:
            pins = self._own_pins
            for slot in slots:
                pins[slot] -= 1

    def get_many(self, cache_keys: Sequence[int], out: torch.Tensor) -> List[Optional[Tuple[int, ...]]]:
        """Copy every hit's entry into ``out[i]`` with one tensor operation; return each hit's
        token counts (K0, V0, K1, ...) and None for a miss, whose row is left as it was.

        ``out`` is a tensor ``(len(keys), 2 * layers, n, heads, max_tokens, head_dim)`` of the
        pool's dtype on its device (see :attr:`EntrySpec.block_shape`).
        """
        keys = check_keys(cache_keys)
        self._start_call()
        if not isinstance(out, torch.Tensor):
            raise EntryMismatchError(f"out must be a torch.Tensor, got {type(out).__name__}")
        spec = self._spec
        if spec is not None and (out.shape != (len(keys), *spec.block_shape) or out.dtype != spec.dtype
                                 or out.device != spec.device):
            raise EntryMismatchError(
                f"out is {tuple(out.shape)} {out.dtype} on {out.device}; this batch needs "
                f"{(len(keys), *spec.block_shape)} {spec.dtype} on {spec.device}")
        with self._pin_many(keys) as batch:
            hits = [i for i, slot in enumerate(batch.slots) if slot >= 0]
            if hits:
                rows = (out.detach() if out.requires_grad else out).unbind(0)
                torch._foreach_copy_([rows[i] for i in hits], [batch.view(i) for i in hits])
            return [batch.sizes(i) if slot >= 0 else None for i, slot in enumerate(batch.slots)]

    def write_many(self, cache_keys: Sequence[int], sizes: Sequence[SizesLike], priority: Optional[float] = None,
                   *, holder: Optional[int] = None, partial: bool = False,
                   entry_spec: Optional[EntrySpec] = None) -> WriteBatch:
        """Reserve a slot per key under one lock acquisition: a :class:`WriteBatch` whose slot
        tensors the caller writes (one scatter for the whole batch), then commits.

        ``sizes[i]`` is entry ``i``'s token count (an int, or one per cache). A key already
        stored gets a new slot at the commit, its old one is freed (FIFO: it becomes newest).
        Raises :class:`PoolExhaustedError`, changing nothing, when the pool cannot free a slot
        for every key (pinned or held); with ``partial=True`` it reserves what it can and the
        batch reports the rest as refused. ``entry_spec`` shapes a pool that has no slots yet.
        """
        keys = check_keys(cache_keys)
        prio = 0.0 if priority is None else check_priority(priority)
        boolean("partial", partial)
        if entry_spec is not None:
            instance_of("entry_spec", entry_spec, EntrySpec)
        self._start_call()
        if holder is not None:
            self._check_holder(holder)
        spec = self._spec if self._spec is not None else entry_spec
        if spec is None:
            raise EntryMismatchError(f"pool {self.name!r} has no slots yet: pass entry_spec= (or set one entry)")
        if entry_spec is not None and entry_spec is not spec and entry_spec != spec:
            raise EntryMismatchError(f"entry_spec {entry_spec} differs from the pool's slots {spec}")
        rows = check_sizes(sizes, len(keys), 2 * spec.num_layers, spec.max_tokens)
        distinct = len(set(keys)) == len(keys)
        slots = self._reserve_many(keys, distinct, spec, partial)
        assert self._storage is not None
        return WriteBatch(self, keys, slots, rows, prio, holder, self._storage, distinct)

    def _reserve_many(self, keys: List[int], distinct: bool, spec: EntrySpec, partial: bool) -> List[int]:
        """Reserve one slot per distinct key (split writes: WRITING and pinned); the slot of each
        position, -1 where refused. Waits, bounded by the lock timeout, for other writers' slots."""
        if distinct:
            order = keys
        else:  # each key once, in the order of its last position
            last = {k: i for i, k in enumerate(keys)}
            order = sorted(last, key=last.__getitem__)
        deadline = 0.0
        while True:
            held = self._acquire(True)
            try:
                self._check_not_closed("write_many")
                if self._spec is None:
                    self._allocate_storage(spec)
                got = self._reserve_locked(len(order), partial, not deadline or time.monotonic() < deadline)
            finally:
                held.release()
            if got is not None:
                if order is keys and len(got) == len(keys):
                    return got
                where = dict(zip(order, got))
                return [where.get(k, -1) for k in keys]
            deadline = deadline or time.monotonic() + self._timeout
            time.sleep(0.0001)

    def _reserve_locked(self, count: int, partial: bool, may_wait: bool) -> Optional[List[int]]:
        """Under the exclusive lock: ``count`` reserved slots (fewer if ``partial``), or None to
        wait for other writers' slots, or :class:`PoolExhaustedError` with nothing changed."""
        slots = self._slots
        with slots.changing, self._meta_lock:
            if not partial and not slots.can_take(count):
                if may_wait and slots.any_writing():
                    return None
                raise PoolExhaustedError(f"{self.name}: cannot free {count} slots; the others are pinned or held")
            got = slots.reserve_many(count)  # fewer only if partial: the rest are refused
            if got:
                self._inflight += 1
            return got

    def _end_writes(self, slots: List[int], keys: Optional[List[int]], prio: float, holder: Optional[int]) -> bool:
        """Under the exclusive lock, end a batch of split writes: publish ``slots`` as ``keys``'
        entries (held by ``holder``), or hand them back when ``keys`` is None or the pool was
        closed meanwhile. Return whether it published."""
        if not slots:
            return not self._closed
        try:
            held = self._acquire(True)
        except BaseException:
            with self._meta_lock:
                self._inflight -= 1
            raise
        try:
            table = self._slots
            with table.changing, self._meta_lock:
                self._inflight -= 1
                publish = keys is not None and not self._closed
                if keys is not None and publish:
                    table.publish_many(keys, slots, prio, holder)
                else:
                    for slot in slots:
                        table.unreserve(slot)
                        table.give_back(slot)
            return publish
        finally:
            held.release()

    def set_many(self, cache_keys: Sequence[int], entries: Any, sizes: Optional[Sequence[SizesLike]] = None,
                 priority: Optional[float] = None, *, holder: Optional[int] = None, partial: bool = False,
                 entry_spec: Optional[EntrySpec] = None) -> List[int]:
        """Deep-copy a batch of entries into the pool with one tensor operation; return each
        key's slot (-1 where refused, with ``partial=True``).

        ``entries`` is a sequence of entries (``KeysValues``, ours or LightZero's), one tensor
        ``(len(keys), 2 * layers, n, heads, max_tokens, head_dim)`` with ``sizes``, or a sequence of
        tensors ``(2 * layers, n, heads, tokens, head_dim)`` with ``sizes``, each the first ``tokens``
        tokens of its entry (at least its valid ones: the rest of the slot is left as it was).
        Everything is validated before anything changes; semantics as :meth:`write_many` (a key
        given twice is stored once, from its last position); ``entry_spec`` shapes a pool that
        has no slots yet. In process, the batch is reserved, copied and published under one
        hold of the lock.
        """
        keys = check_keys(cache_keys)
        if entry_spec is not None:
            instance_of("entry_spec", entry_spec, EntrySpec)
        self._start_call()
        spec, data, rows = entries_data(self._spec or entry_spec, entries, sizes, len(keys))
        if not self._split_writes and self._spec is not None and spec == self._spec and len(set(keys)) == len(keys):
            # In process: reserve, copy and publish under one hold of the lock, as set does.
            prio = 0.0 if priority is None else check_priority(priority)
            boolean("partial", partial)
            if holder is not None:
                self._check_holder(holder)
            return self._set_many_locked(keys, data, rows, prio, holder, partial)
        batch = self.write_many(keys, rows, priority, holder=holder, partial=partial, entry_spec=spec)
        with batch:
            assert self._storage is not None
            dst, src = _copy_pairs(self._storage, [(i, batch.slots[i]) for i in batch.positions()], data)
            if dst:
                torch._foreach_copy_(dst, src)
        return batch.slots

    def _set_many_locked(self, keys: List[int], data: List[Any], rows: List[Tuple[int, ...]], prio: float,
                         holder: Optional[int], partial: bool) -> List[int]:
        """set_many of distinct keys under the exclusive lock: one acquisition for the batch."""
        held = self._acquire(True)
        try:
            self._check_not_closed("set_many")
            table, storage = self._slots, self._storage
            assert storage is not None
            with table.changing:
                with self._meta_lock:
                    if not partial and not table.can_take(len(keys)):
                        raise PoolExhaustedError(f"{self.name}: cannot free {len(keys)} slots; the others are pinned or held")
                    got = table.reserve_many(len(keys))
                try:
                    dst, src = _copy_pairs(storage, list(enumerate(got)), data)
                    if dst:
                        torch._foreach_copy_(dst, src)
                except BaseException:
                    with self._meta_lock:
                        for slot in got:
                            table.unreserve(slot)
                            table.give_back(slot)
                    raise
                for i, slot in enumerate(got):
                    storage.record_sizes(slot, rows[i])
                with self._meta_lock:
                    table.publish_many(keys[: len(got)], got, prio, holder)
            return got + [-1] * (len(keys) - len(got))
        finally:
            held.release()

    def __contains__(self, cache_key: object) -> bool:
        key = check_key(cache_key)
        self._start_call()
        return self._index.get(key) is not None

    def __len__(self) -> int:
        return len(self._index) if not self._closed else 0

    def keys(self) -> List[int]:
        """The keys stored now (a snapshot)."""
        self._start_call()
        if self._capacity is None:
            return []
        held = self._acquire(False)
        try:
            return list(self._index)
        finally:
            held.release()

    # -- writes --------------------------------------------------------------------------

    def _check_out(self, out: Any) -> Optional[List[torch.Tensor]]:
        """Validate a read buffer; return its tensors (one per cache, detached) unless it is one
        of our intact entries. Its token counts are about to be overwritten, so one of ours only
        needs its block's shape, dtype and device checked (the hot path)."""
        spec = self._spec
        if spec is not None and spec.own_block(out) is not None:
            return None
        _, data, _ = self._check_entry(out)
        return None if isinstance(data, torch.Tensor) else data

    def _check_entry(self, kv: Any) -> Tuple[EntrySpec, Any, Tuple[int, ...]]:
        spec = self._spec if self._spec is not None else EntrySpec.of(kv)
        data, sizes = spec.check(kv)
        return spec, data, sizes

    def set(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None, *,
            holder: Optional[int] = None) -> int:
        """Deep-copy ``kv_cache`` into the pool under ``cache_key``; return its slot index.

        A new key takes a free slot, else evicts the policy's victim. An existing key is rewritten
        in place (FIFO order unchanged; LRU makes it most recent; PRIORITY takes the new
        priority). ``priority`` (default 0.0) matters to PRIORITY pools: lowest goes first.
        With ``holder`` (from :meth:`add_holder`) the entry is also held by that holder.
        Raises :class:`PoolExhaustedError` when every slot is pinned by a lease or held;
        nothing changes then.
        """
        key = check_key(cache_key)
        prio = 0.0 if priority is None else check_priority(priority)
        self._start_call()
        if holder is not None:
            self._check_holder(holder)
        spec, data, sizes = self._check_entry(kv_cache)
        if self._split_writes:
            return self._set_split(key, data, sizes, prio, holder)
        held = self._acquire(True)
        try:
            self._check_not_closed("set")
            if self._spec is None:
                self._allocate_storage(spec)
            elif spec is not self._spec and spec != self._spec:  # another thread allocated it first
                _, data, sizes = self._check_entry(kv_cache)
            return self._set_locked(key, data, sizes, prio, holder)
        finally:
            held.release()

    def _check_not_closed(self, during: str) -> None:
        if self._closed:
            raise ClosedError(f"pool {self.name!r} was closed during {during}")

    def _set_locked(self, key: int, data: Any, sizes: Tuple[int, ...], prio: float, holder: Optional[int]) -> int:
        """Store under the exclusive lock: rewrite the key's slot in place, or fill another."""
        slots, storage = self._slots, self._storage
        assert storage is not None
        old = self._index.get(key)
        with slots.changing:
            with self._meta_lock:
                # A lease in another process may end right now (unpins take no pool lock), so
                # a leased old slot must not become the victim: it is retired by publish instead.
                in_place = old is not None and not self._state.pins.total(old)
                slot = old if in_place and old is not None else slots.take(keep=old)
            slots.writing(slot, key)
            if self._fault is not None:
                self._fault("writing")
            try:
                storage.write(slot, data, sizes)
            except BaseException:
                with self._meta_lock:
                    if in_place:
                        slots.drop(key, slot)  # never serve a half-written entry; frees the slot
                    else:
                        slots.give_back(slot)
                raise
            with self._meta_lock:
                if in_place:
                    slots.republish(slot, prio)
                else:
                    slots.publish(key, slot, prio)
                if holder is not None:
                    slots.hold(slot, holder)
            return slot

    def _set_split(self, key: int, data: Any, sizes: Tuple[int, ...], prio: float, holder: Optional[int]) -> int:
        """``set`` of a new key in three steps, so that other processes read and write while
        this one copies: reserve a slot (exclusive lock), copy into it (no lock), publish it
        (exclusive lock). A rewrite of a stored key is done in place under the lock instead.

        If this process dies mid-copy, reaping its row leaves the reserved slot WRITING with no
        pin, which the next sweep frees; the key was never published.
        """
        slots = self._slots
        deadline = time.monotonic() + self._timeout
        while True:
            held = self._acquire(True)
            try:
                self._check_not_closed("set")
                if self._index.get(key) is not None:
                    return self._set_locked(key, data, sizes, prio, holder)
                try:
                    with slots.changing, self._meta_lock:
                        slot = slots.reserve()
                        self._inflight += 1
                except PoolExhaustedError:
                    # Slots reserved by writes in flight come back within microseconds: wait
                    # for them; slots pinned by leases alone are a real exhaustion.
                    if not slots.any_writing() or time.monotonic() >= deadline:
                        raise
                    slot = -1
                storage = self._storage
            finally:
                held.release()
            if slot >= 0:
                break
            time.sleep(0.0001)
        assert storage is not None
        try:
            if self._fault is not None:
                self._fault("writing")
            storage.write(slot, data, sizes)
        except BaseException:
            self._end_split_write(slot)
            raise
        if not self._end_split_write(slot, key, prio, holder):
            raise ClosedError(f"pool {self.name!r} was closed during set")
        return slot

    def _end_split_write(self, slot: int, key: Optional[int] = None, prio: float = 0.0,
                         holder: Optional[int] = None) -> bool:
        """Under the exclusive lock, end a split write: publish ``slot`` as ``key``'s entry (newer
        than any value stored meanwhile), or hand the slot back when there is no key (the copy
        failed) or the pool was closed meanwhile (close() is waiting). Return whether it published."""
        try:
            held = self._acquire(True)
        except BaseException:
            with self._meta_lock:  # the slot stays pinned until this process closes or exits
                self._inflight -= 1
            raise
        try:
            slots = self._slots
            with slots.changing, self._meta_lock:
                slots.unreserve(slot)
                self._inflight -= 1
                publish = key is not None and not self._closed
                if key is not None and publish:
                    slots.publish(key, slot, prio)
                    if holder is not None:
                        slots.hold(slot, holder)
                else:
                    slots.give_back(slot)
            return publish
        finally:
            held.release()

    def delete(self, cache_key: int) -> bool:
        """Remove ``cache_key``; return whether it was present."""
        key = check_key(cache_key)
        self._start_call()
        if self._capacity is None:
            return False
        held = self._acquire(True)
        try:
            slot = self._index.get(key)
            if slot is None:
                return False
            with self._slots.changing, self._meta_lock:
                self._slots.drop(key, slot)
            return True
        finally:
            held.release()

    def clear(self) -> None:
        """Remove every entry. Slot storage is kept for reuse; counters are kept too."""
        self._start_call()
        if self._capacity is None:
            return
        held = self._acquire(True)
        try:
            with self._slots.changing, self._meta_lock:
                self._slots.drop_all()
        finally:
            held.release()

    # -- holders -------------------------------------------------------------------------

    def add_holder(self, exclusive: bool = False) -> int:
        """Register a holder (a collector) in this process; return its id for ``set(holder=)``
        and :meth:`release`. A holder's entries are never evicted, and another holder's
        :meth:`release` does not remove them. ``exclusive=True`` refuses a pool that another
        holder already uses (a collector's own root pool). Holders of a process that dies are
        released by crash repair."""
        boolean("exclusive", exclusive)
        self._start_call()
        if self._capacity is None:
            raise ConfigError(f"pool {self.name!r} has no slots yet: give pool_size or entry_spec to hold entries")
        held = self._acquire(True)
        try:
            with self._meta_lock:
                holds = self._state.holds
                if self._shared:
                    self._slots.reap()  # a dead collector's row is free again
                others = [h for h in range(len(holds.rows)) if holds.pid[h]]
                if exclusive and others:
                    raise ConfigError(f"pool {self.name!r} is held by another collector (holders {others})")
                try:
                    return holds.claim(os.getpid(), start_time(os.getpid()) if self._shared else 0)
                except RuntimeError as exc:
                    raise ConfigError(f"pool {self.name!r}: {exc}") from None
        finally:
            held.release()

    def release(self, holder: int) -> int:
        """Let go of every entry ``holder`` holds: those no other holder holds are removed (the
        holder's own clear); the rest stay. Return how many were removed."""
        self._start_call()
        self._check_holder(holder)
        held = self._acquire(True)
        try:
            with self._slots.changing, self._meta_lock:
                return self._slots.let_go(holder)
        finally:
            held.release()

    def remove_holder(self, holder: int) -> int:
        """:meth:`release` ``holder`` and retire its id; return how many entries were removed."""
        self._start_call()
        self._check_holder(holder)
        held = self._acquire(True)
        try:
            with self._slots.changing, self._meta_lock:
                removed = self._slots.let_go(holder)
                self._state.holds.pid[holder] = 0
                return removed
        finally:
            held.release()

    def _check_holder(self, holder: Any) -> None:
        holds = getattr(getattr(self, "_state", None), "holds", None)
        if isinstance(holder, bool) or not isinstance(holder, int) or holds is None \
                or not 0 <= holder < len(holds.rows) or holds.pid[holder] != self._pid:
            raise HolderError(f"pool {self.name!r}: {holder!r} is not a holder this process added (add_holder)")

    def recover(self) -> List[int]:
        """Reclaim what dead worker processes held (pins, half-written slots); return their pids.

        Shared pools also do this on their own: at the next lock acquisition after a crash in
        the middle of a change, and every 0.25 s from a writer. Call it to do it now.
        """
        self._start_call()
        if not self._shared:
            return []
        held = self._acquire(True)
        try:
            with self._meta_lock:
                return self._slots.reap()
        finally:
            held.release()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Drop this process's view of the pool and release its storage. Idempotent.

        For a shared pool, the creating process also removes the segments; a worker releases
        its row (pins) and unmaps.
        """
        if self._closed:
            return
        held = self._lock.acquire_write(self._timeout)
        try:
            self._closed = True
        finally:
            held.release()
        self._wait_for_split_writes()
        held = self._lock.acquire_write(self._timeout)
        try:
            if self._parts is not None:
                self._parts.state.release_worker()
            self._storage = None
        finally:
            held.release()
        self._index = {}
        if self._parts is not None:
            self._parts.close()
            shared_memory.untrack_forks(self)

    def _wait_for_split_writes(self) -> None:
        """Let this process's writes that are copying outside the lock finish (each then
        hands its slot back, seeing the pool closed) before the storage goes away. Bounded by
        the lock timeout: a thread stuck longer loses its write, not the process its memory."""
        deadline = time.monotonic() + self._timeout
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.0005)

    def __enter__(self) -> "KVCachePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def occupancy(self) -> Occupancy:
        """Counts of live, free, retired and pinned slots (taken under the exclusive lock)."""
        self._start_call()
        if not self._capacity:
            return Occupancy(0, 0, 0, 0, 0, 0)
        held = self._acquire(True)
        try:
            with self._meta_lock:
                return self._slots.occupancy()
        finally:
            held.release()

    def check(self) -> None:
        """Verify the bookkeeping invariants; raise :class:`InvariantError` on the first broken one.

        It takes the exclusive lock, so it may run while other threads and processes work. A
        shared pool first reclaims what dead workers left (pins, slots they were writing).
        """
        self._start_call()
        if self._capacity is None:
            return
        held = self._acquire(True)
        try:
            with self._meta_lock:
                if self._shared:
                    self._slots.reap()
                self._slots.audit()
        finally:
            held.release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._index)}/{self._capacity}"
        kind = ", shared" if self._shared else ""
        return f"KVCachePool(name={self.name!r}, {state}, strategy={self._policy_cls.name}{kind})"
