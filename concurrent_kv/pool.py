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
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Tuple, Type, Union

import torch

from . import shared as shared_memory
from .cells import Cells
from .checks import boolean, instance_of, positive_int, positive_seconds
from .entry import EntrySpec, KeysValues
from .errors import ClosedError, ConfigError, EntryMismatchError, HolderError
from .eviction import EvictionPolicy, EvictionStrategy, check_priority, resolve_policy
from .keys import check_key
from .locks import LOCK_KINDS, PoolLock, Releasable, make_lock
from .pool_batches import BatchPaths
from .pool_writes import WritePaths
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


class KVCachePool(WritePaths, BatchPaths):
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

    @property
    def enable_stats(self) -> bool:
        """Whether this pool counts hits, misses and evictions (LightZero's attribute name)."""
        return self._stats_on

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

    def key_index(self) -> Mapping[int, int]:
        """A read-only snapshot ``{key: slot}`` of the entries stored now.

        Taken in one hold of the read lock, so it is consistent (no key twice, no slot twice, as
        of one instant) however many threads or processes write meanwhile; it does not change
        afterwards. Slot numbers are what :meth:`set` returned.
        """
        self._start_call()
        if self._capacity is None:
            return MappingProxyType({})
        held = self._acquire(False)
        try:
            return MappingProxyType(dict(self._index.items()))
        finally:
            held.release()

    @property
    def _key_to_index(self) -> Mapping[int, int]:
        """Compatibility surface for LightZero's main branch, whose ``world_model.py`` reads
        ``pool._key_to_index.keys()`` to drop token contexts of evicted keys: the
        :meth:`key_index` snapshot, read-only (LightZero only reads it)."""
        return self.key_index()

    # -- writes --------------------------------------------------------------------------

    def _check_out(self, out: Any) -> Optional[List[torch.Tensor]]:
        """Validate a read buffer; return its tensors (one per cache, detached) unless it is one
        of our intact entries. Its token counts are about to be overwritten, so one of ours only
        needs its block's shape, dtype and device checked (the hot path)."""
        spec = self._spec
        if spec is not None:
            if spec.own_block(out) is not None:
                return None
            fitting = spec._fitting_foreign(out)  # LightZero's layout: the next hot path
            if fitting is not None:
                return fitting[0]
        _, data, _ = self._check_entry(out)  # anything else: the full check, and its errors
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
