"""``KVCachePool``: a fixed number of preallocated slots behind a key index.

A pool is handed its pieces and only orchestrates them: metadata (:mod:`concurrent_kv.state`:
the key index, per-slot arrays, free stack, pins, counters, the eviction policy), slot storage
(:mod:`concurrent_kv.storage`), a lock (:mod:`concurrent_kv.locks`). With ``shared=True`` the
same code runs over shared memory, and worker processes attach by handle.

Locking, in two levels:

* the **pool lock** (reader-writer by default) guards slot *contents* and the index: ``get``
  copies out under a shared hold, so readers copy in parallel; ``set``/``delete``/``clear`` hold
  it exclusively, including the copy in, so no reader sees a half-written entry. Shared pools
  add ``flock`` across processes (released by the kernel if a holder dies);
* the **bookkeeping lock** (a ``threading.Lock`` held for a few list operations) guards what
  readers and lease exits change under a shared hold: counters, LRU recency, pin counts.

Leases pin a slot: a pinned slot is never evicted nor overwritten. Rewriting a leased key writes
the new value to another slot; deleting or clearing it *retires* the slot, which is reused once
its pins are gone.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, Type, Union

import torch

from .entry import EntrySpec, KeysValues
from .errors import ClosedError, ConfigError, EntryMismatchError, InvariantError, PoolExhaustedError
from .eviction import EvictionPolicy, EvictionStrategy, check_priority, resolve_policy
from .keys import check_key
from .locks import LOCK_KINDS, PoolLock, ProcessLock, make_lock
from .shm import AttachError, Segment
from .state import (
    DIRTY,
    EVICTED,
    FREE,
    INSERTED,
    LAST_REAP_NS,
    READY,
    REMOVED,
    RETIRED,
    RETIRED_COUNT,
    WRITING,
    LocalState,
    SharedState,
)
from .stats import EVICTIONS, HITS, INSERTS, MISSES, UPDATES, CacheStats, StatsSnapshot
from .storage import SlotStorage

__all__ = ["KVCachePool", "Lease", "PoolHandle", "Occupancy"]

StrategyLike = Union[EvictionStrategy, str, Type[EvictionPolicy]]
#: How often a writer of a shared pool looks for dead workers whose pins must be reclaimed.
REAP_INTERVAL_NS = 250_000_000
#: The most slots a pool may have. UniZero needs thousands; metadata is allocated up front, so
#: an absurd size must fail here with a clear error, not exhaust the machine's memory.
MAX_SLOTS = 1 << 22


def _check_capacity(capacity: int, what: str) -> int:
    if capacity > MAX_SLOTS:
        raise ConfigError(f"{what} gives {capacity:,} slots; a pool holds at most {MAX_SLOTS:,}")
    return capacity


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PoolHandle:
    """What a worker process needs to attach to a shared pool: names and layout, no data."""

    name: str
    meta_path: str
    data_path: str
    capacity: int
    policy: str
    spec: Tuple[int, int, int, int, int, str]  # layers, n, heads, max_tokens, head_dim, dtype
    max_workers: int
    lock: str
    lock_timeout: float
    enable_stats: bool

    def entry_spec(self) -> EntrySpec:
        layers, n, heads, tokens, head_dim, dtype = self.spec
        return EntrySpec(layers, n, heads, tokens, head_dim, dtype=getattr(torch, dtype.replace("torch.", "")))


@dataclass(frozen=True)
class Occupancy:
    """How a pool's slots are used at one instant (see :meth:`KVCachePool.occupancy`)."""

    capacity: int
    live: int  # slots holding an entry
    free: int  # slots ready for reuse
    retired: int  # slots whose entry was removed while leased, reused once unpinned
    pinned: int  # slots with at least one lease
    pins: int  # leases held, over all processes


def _map_block(path: str, capacity: int, spec: EntrySpec) -> torch.Tensor:
    """The slot tensor over a data segment, in torch shared memory (``from_file``, MAP_SHARED)."""
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    per_slot = 1
    for d in spec.block_shape:
        per_slot *= d
    skip = 64 // itemsize  # the segment header
    flat = torch.from_file(path, shared=True, size=skip + capacity * per_slot, dtype=spec.dtype)
    return flat[skip:].view(capacity, *spec.block_shape)


_shared_pools: "weakref.WeakSet[KVCachePool]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_shared_pools):
        pool._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
            _check_capacity(_positive_int("pool_size", pool_size), "pool_size")
        if max_bytes is not None:
            _positive_int("max_bytes", max_bytes)
        if not isinstance(enable_stats, bool):
            raise ConfigError(f"enable_stats must be a bool, got {enable_stats!r}")
        if not isinstance(name, str):
            raise ConfigError(f"name must be a str, got {type(name).__name__}")
        if entry_spec is not None and not isinstance(entry_spec, EntrySpec):
            raise ConfigError(f"entry_spec must be an EntrySpec, got {type(entry_spec).__name__}")
        if not isinstance(shared, bool):
            raise ConfigError(f"shared must be a bool, got {shared!r}")
        _positive_int("max_workers", max_workers)
        self._policy_cls = resolve_policy(eviction_strategy)
        self.eviction_strategy = eviction_strategy
        self.name = name
        self._timeout = _positive_float("lock_timeout", lock_timeout)
        self._stats_on = enable_stats
        self._max_bytes = max_bytes
        self._capacity: Optional[int] = pool_size
        self._closed = False
        self._shared = shared
        self._owner = True
        self._pid = os.getpid()
        self._fault: Optional[Callable[[str], None]] = None  # test hook: called at named points
        self._book = threading.Lock()
        self._inflight = 0  # this process's writes copying outside the lock (close waits for them)
        self._split_writes = False  # set by _open_shared
        self._spec: Optional[EntrySpec] = None
        self._storage: Optional[SlotStorage] = None
        self._stats: Any = CacheStats()
        self._read_books = enable_stats
        self._touch_on_read = False
        self._index: Any = {}
        if shared:
            if entry_spec is None:
                raise ConfigError("a shared pool needs entry_spec (its slots are laid out before any entry)")
            if entry_spec.device.type != "cpu":
                raise ConfigError("a shared pool keeps its slots in host shared memory: entry_spec.device must be cpu")
            if not isinstance(lock, str) or lock not in LOCK_KINDS:
                raise ConfigError(f"a shared pool's lock must be one of {LOCK_KINDS}, got {lock!r}")
            self._create_shared(entry_spec, lock, max_workers)
            return
        self._lock: Any = make_lock(lock, name)
        if pool_size is not None:
            self._bind(LocalState(pool_size, self._policy_cls))
        if entry_spec is not None:
            self._format(entry_spec)

    # -- set-up ---------------------------------------------------------------------------

    def _bind(self, state: Any) -> None:
        """Alias the metadata structures (attribute lookups are the hot path's main cost)."""
        self._state = state
        self._capacity = state.capacity
        self._index = state.index
        self._slot_key = state.slot_key
        self._slot_state = state.slot_state
        self._free = state.free
        self._life = state.life
        self._policy = state.policy
        if getattr(state, "pins", None) is not None:
            self._pins = state.pins
            self._stats = state.stats
            self._counters = state.stats.counters
        # Shared LRU reads reorder links other processes read: they take the lock exclusively.
        self._read_exclusive = state.shared and self._policy.reads_mutate
        self._touch_on_read = self._policy.reads_mutate
        self._read_books = self._stats_on or self._touch_on_read

    def _format(self, spec: EntrySpec) -> None:
        """Allocate slot storage for entries of ``spec`` (once)."""
        if self._capacity is None:
            assert self._max_bytes is not None
            capacity = _check_capacity(self._max_bytes // spec.nbytes, "max_bytes")
            if capacity == 0:
                raise EntryMismatchError(f"one entry takes {spec.nbytes} bytes, more than max_bytes={self._max_bytes}")
            self._bind(LocalState(capacity, self._policy_cls))
        assert self._capacity is not None
        try:
            self._storage = SlotStorage(spec, self._capacity)
        except RuntimeError as exc:  # torch could not allocate the slots
            raise EntryMismatchError(
                f"cannot allocate {self._capacity:,} slots of {spec.nbytes:,} bytes on {spec.device}: {exc}"
            ) from None
        self._spec = spec

    def _create_shared(self, spec: EntrySpec, lock: str, max_workers: int) -> None:
        capacity = self._capacity if self._capacity is not None else (self._max_bytes or 0) // spec.nbytes
        _check_capacity(capacity, "max_bytes")
        if capacity == 0:
            raise EntryMismatchError(f"one entry takes {spec.nbytes} bytes, more than max_bytes={self._max_bytes}")
        policy = self._policy_cls.name
        data = Segment.create(self.name + ".data", capacity * spec.nbytes, SharedState.data_digest(capacity, spec))
        try:
            meta = Segment.create(
                self.name, SharedState.payload_bytes(capacity, spec, max_workers),
                SharedState.digest(capacity, policy, spec, max_workers),
            )
        except BaseException:
            data.close()
            raise
        data.close(unlink=False)  # validated and reserved; torch maps it from here on
        self._data_path = data.path
        self._handle = PoolHandle(
            self.name, meta.path, data.path, capacity, policy,
            (spec.num_layers, spec.num_samples, spec.num_heads, spec.max_tokens, spec.head_dim, str(spec.dtype)),
            max_workers, lock, self._timeout, self._stats_on,
        )
        self._open_shared(meta, spec, capacity, lock, max_workers, create=True)

    def _open_shared(self, meta: Segment, spec: EntrySpec, capacity: int, lock: str, max_workers: int,
                     create: bool) -> None:
        state = SharedState(meta, capacity, self._policy_cls, spec, max_workers, create)
        block = _map_block(self._handle.data_path, capacity, spec)
        self._storage = SlotStorage(spec, capacity, block=block, sizes=state.sizes)
        self._spec = spec
        self._lock = ProcessLock(meta.path, lock, self.name)
        # Copy new entries outside the exclusive lock (see _set_split); with a mutex every hold
        # is exclusive anyway, so the extra lock rounds would buy nothing.
        self._split_writes = lock != "mutex"
        self._bind(state)
        self._claim_worker()
        _shared_pools.add(self)

    def _claim_worker(self) -> None:
        held = self._lock.acquire_write(self._timeout)
        try:
            took_over_dead = self._state.claim_worker()
            self._bind(self._state)
            if took_over_dead:  # its pins were just dropped: reclaim the slots they held
                self._sweep_retired()
        finally:
            held.release()

    def handle(self) -> PoolHandle:
        """A small picklable handle for :meth:`attach` in another process (shared pools only)."""
        self._check_open()
        if not self._shared:
            raise ConfigError(f"pool {self.name!r} is not shared: create it with shared=True to hand it to workers")
        return self._handle

    @classmethod
    def attach(cls, handle: PoolHandle) -> "KVCachePool":
        """The shared pool behind ``handle``, with the same API, in this process."""
        if not isinstance(handle, PoolHandle):
            raise AttachError(f"attach expects a PoolHandle, got {type(handle).__name__}")
        spec = handle.entry_spec()
        data = Segment.attach(handle.data_path, handle.capacity * spec.nbytes, SharedState.data_digest(handle.capacity, spec))
        data.close()
        policy_cls = resolve_policy(handle.policy)
        meta = Segment.attach(
            handle.meta_path,
            SharedState.payload_bytes(handle.capacity, spec, handle.max_workers),
            SharedState.digest(handle.capacity, policy_cls.name, spec, handle.max_workers),
        )
        pool = cls.__new__(cls)
        pool._policy_cls = policy_cls
        pool.eviction_strategy = handle.policy
        pool.name = handle.name
        pool._timeout = handle.lock_timeout
        pool._stats_on = handle.enable_stats
        pool._max_bytes = None
        pool._capacity = handle.capacity
        pool._closed = False
        pool._shared = True
        pool._owner = False
        pool._pid = os.getpid()
        pool._fault = None
        pool._book = threading.Lock()
        pool._inflight = 0
        pool._handle = handle
        pool._data_path = handle.data_path
        try:
            pool._open_shared(meta, spec, handle.capacity, handle.lock, handle.max_workers, create=False)
        except BaseException:
            meta.close()
            raise
        return pool

    def _after_fork(self) -> None:
        """In a forked child: own locks and descriptor, a worker row of its own (claimed on first
        use), and never the owner of the segments."""
        if self._closed:
            return
        self._owner = False
        self._pid = os.getpid()
        self._book = threading.Lock()
        self._inflight = 0
        self._lock.reopen_after_fork()
        self._state.worker = None

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
        with self._book:
            return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (entries are kept)."""
        self._check_open()
        with self._book:
            self._stats.reset()

    # -- locking -------------------------------------------------------------------------

    def _acquire(self, write: bool) -> Any:
        held = self._lock.acquire_write(self._timeout) if write else self._lock.acquire_read(self._timeout)
        if self._shared and self._life[DIRTY]:
            # A process died halfway through changing the pool: repair it, then start over.
            held.release()
            held = self._lock.acquire_write(self._timeout)
            try:
                if self._life[DIRTY]:
                    self._recover()
            finally:
                held.release()
            return self._acquire(write)
        return held

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"pool {self.name!r} is closed")
        if self._shared and self._state.worker is None:
            self._claim_worker()  # first use in a forked child

    # -- reads ---------------------------------------------------------------------------

    def get(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """A private deep copy of the entry under ``cache_key``, or None on a miss.

        With ``out`` (an entry of the pool's shape), the data is copied into it and ``out`` is
        returned, so steady-state reads allocate no tensor.
        """
        key = check_key(cache_key)
        self._check_open()
        if out is not None:
            self._check_out(out)
        if self._capacity is None:
            self._miss_while_unsized()
            return None
        held = self._acquire(self._read_exclusive)
        try:
            slot = self._index.get(key)
            if self._read_books:
                with self._book:
                    if slot is None:
                        self._counters[MISSES] += self._stats_on
                        return None
                    self._counters[HITS] += self._stats_on
                    if self._touch_on_read:
                        self._policy.touch(slot)
            elif slot is None:
                return None
            assert self._storage is not None
            return self._storage.read(slot, out)
        finally:
            held.release()

    def _miss_while_unsized(self) -> None:
        """A lookup in a pool sized by ``max_bytes`` that has no entry yet (no slots at all)."""
        with self._book:
            self._stats.counters[MISSES] += self._stats_on

    def lease(self, cache_key: int) -> Lease:
        """``with pool.lease(key) as kv:`` a zero-copy view, pinned until the block exits.

        ``kv`` is None on a miss. While pinned, the slot is never evicted or overwritten: a
        ``set`` of the same key stores the new value in another slot.
        """
        key = check_key(cache_key)
        self._check_open()
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
            with self._book:
                if slot is None:
                    self._counters[MISSES] += self._stats_on
                    return -1
                self._counters[HITS] += self._stats_on
                if self._touch_on_read:
                    self._policy.touch(slot)
                self._pins.own[slot] += 1
                return slot
        finally:
            held.release()

    def _storage_view(self, slot: int) -> KeysValues:
        assert self._storage is not None
        return self._storage.view(slot)

    def _unpin(self, slot: int) -> None:
        # Only this process's pin row changes; a retired slot is reclaimed by the next writer.
        with self._book:
            self._pins.own[slot] -= 1

    def __contains__(self, cache_key: object) -> bool:
        key = check_key(cache_key)
        self._check_open()
        return self._index.get(key) is not None

    def __len__(self) -> int:
        return len(self._index) if not self._closed else 0

    def keys(self) -> List[int]:
        """The keys stored now (a snapshot)."""
        self._check_open()
        if self._capacity is None:
            return []
        held = self._acquire(False)
        try:
            return list(self._index)
        finally:
            held.release()

    # -- writes --------------------------------------------------------------------------

    def _check_out(self, out: Any) -> None:
        """Validate a read buffer. Its token counts are about to be overwritten, so one of our
        intact entries only needs its block's shape, dtype and device checked (the hot path)."""
        spec = self._spec
        if spec is None or spec.own_block(out) is None:
            self._check_entry(out)

    def _check_entry(self, kv: Any) -> Tuple[EntrySpec, Any, Tuple[int, ...]]:
        spec = self._spec if self._spec is not None else EntrySpec.of(kv)
        data, sizes = spec.check(kv)
        return spec, data, sizes

    def set(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        """Deep-copy ``kv_cache`` into the pool under ``cache_key``; return its slot index.

        A new key takes a free slot, else evicts the policy's victim. An existing key is rewritten
        in place (FIFO order unchanged; LRU makes it most recent; PRIORITY takes the new
        priority). ``priority`` (default 0.0) matters to PRIORITY pools: lowest goes first.
        Raises :class:`PoolExhaustedError` when every slot is pinned by a lease.
        """
        key = check_key(cache_key)
        prio = 0.0 if priority is None else check_priority(priority)
        self._check_open()
        spec, data, sizes = self._check_entry(kv_cache)
        if self._split_writes and self._spec is not None:
            return self._set_split(key, data, sizes, prio)
        held = self._acquire(True)
        try:
            self._check_open()
            if self._spec is None:
                self._format(spec)
            elif spec is not self._spec and spec != self._spec:  # another thread formatted it first
                _, data, sizes = self._check_entry(kv_cache)
            return self._set_locked(key, data, sizes, prio)
        finally:
            held.release()

    def _set_locked(self, key: int, data: Any, sizes: Tuple[int, ...], prio: float) -> int:
        life, states = self._life, self._slot_state
        old = self._index.get(key)
        life[DIRTY] = self._pid  # from here until the end, a crash leaves work for _recover
        try:
            with self._book:
                in_place = old is not None and not self._pins[old]
                # A lease in another process may end right now (unpins take no pool lock), so
                # the old slot must not become the victim: it is retired below instead.
                slot = old if in_place else self._take_slot(keep=old)
            assert self._storage is not None and slot is not None
            states[slot] = WRITING
            if not in_place:
                self._slot_key[slot] = key
            if self._fault is not None:
                self._fault("writing")
            try:
                self._storage.write(slot, data, sizes)
            except BaseException:
                with self._book:
                    if in_place:
                        self._drop(key, slot)  # never serve a half-written entry; frees the slot
                    else:
                        states[slot] = FREE
                        self._free.append(slot)
                raise
            with self._book:
                if in_place:
                    states[slot] = READY
                    self._policy.update(slot, prio)
                    self._counters[UPDATES] += self._stats_on
                    return slot
                if old is not None:  # the old value is leased: retire its slot
                    self._drop(key, old)
                    self._counters[UPDATES] += self._stats_on
                else:
                    self._counters[INSERTS] += self._stats_on
                self._index[key] = slot
                states[slot] = READY
                self._policy.insert(slot, prio)
                life[INSERTED] += 1
                return slot
        finally:
            life[DIRTY] = 0

    def _set_split(self, key: int, data: Any, sizes: Tuple[int, ...], prio: float) -> int:
        """``set`` of a new key in three steps, so that other processes read and write while
        this one copies: reserve a slot (exclusive lock), copy into it (no lock), publish it
        (exclusive lock). A rewrite of a stored key is done in place under the lock instead.

        The reserved slot is WRITING and pinned in this process's row: no one else serves,
        evicts or frees it. If this process dies mid-copy, reaping its row leaves the slot
        WRITING with no pin, which the next sweep frees; the key was never published.
        """
        deadline = time.monotonic() + self._timeout
        while True:
            held = self._acquire(True)
            try:
                self._check_open()
                if self._index.get(key) is not None:
                    return self._set_locked(key, data, sizes, prio)
                life = self._life
                life[DIRTY] = self._pid
                try:
                    with self._book:
                        slot = self._take_slot()
                        self._pins.own[slot] += 1
                        self._slot_state[slot] = WRITING
                        self._inflight += 1
                except PoolExhaustedError:
                    # Slots reserved by writes in flight come back within microseconds: wait
                    # for them; slots pinned by leases alone are a real exhaustion.
                    if WRITING not in [self._slot_state[s] for s in range(self._capacity or 0)] \
                            or time.monotonic() >= deadline:
                        raise
                    slot = -1
                finally:
                    life[DIRTY] = 0
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
        if not self._end_split_write(slot, key, prio):
            raise ClosedError(f"pool {self.name!r} was closed during set")
        return slot

    def _end_split_write(self, slot: int, key: Optional[int] = None, prio: float = 0.0) -> bool:
        """Under the exclusive lock, end a split write: publish ``slot`` as ``key``'s entry (newer
        than any value stored meanwhile), or hand the slot back when there is no key (the copy
        failed) or the pool was closed meanwhile (close() is waiting). Return whether it published."""
        try:
            held = self._acquire(True)
        except BaseException:
            with self._book:  # the slot stays pinned until this process closes or exits
                self._inflight -= 1
            raise
        try:
            life = self._life
            life[DIRTY] = self._pid
            with self._book:
                self._pins.own[slot] -= 1
                self._inflight -= 1
                publish = key is not None and not self._closed
                if key is not None and publish:
                    old = self._index.get(key)
                    if old is not None:  # another writer published this key while we copied
                        self._drop(key, old)
                        self._counters[UPDATES] += self._stats_on
                    else:
                        self._counters[INSERTS] += self._stats_on
                    self._slot_key[slot] = key
                    self._index[key] = slot
                    self._slot_state[slot] = READY
                    self._policy.insert(slot, prio)
                    life[INSERTED] += 1
                else:
                    self._slot_state[slot] = FREE
                    self._free.append(slot)
            life[DIRTY] = 0
            return publish
        finally:
            held.release()

    def _take_slot(self, keep: Optional[int] = None) -> int:
        """A free slot, else the policy's unpinned victim other than ``keep`` (evicted here)."""
        free = self._free
        total = self._pins.total
        if keep is None:
            is_pinned: Callable[[int], Any] = total
        else:
            def is_pinned(slot: int) -> Any:
                return slot == keep or total(slot)

        if self._shared and time.monotonic_ns() - self._life[LAST_REAP_NS] > REAP_INTERVAL_NS:
            if self._state.reap_dead_workers():
                self._sweep_retired()  # their half-copied slots too
        if not free and self._life[RETIRED_COUNT]:
            self._sweep_retired()
        if free:
            return free.pop()
        victim = self._policy.victim(is_pinned)
        if victim is None and self._shared:  # maybe the pins belong to a dead worker
            self._state.reap_dead_workers()
            self._sweep_retired()
            if free:
                return free.pop()
            victim = self._policy.victim(is_pinned)
        if victim is None:
            raise PoolExhaustedError(f"{self.name}: all {self._capacity} slots are pinned by leases")
        del self._index[self._slot_key[victim]]
        self._slot_state[victim] = FREE
        self._policy.remove(victim)
        self._life[EVICTED] += 1
        self._counters[EVICTIONS] += self._stats_on
        return victim

    def _sweep_retired(self) -> None:
        """Return retired slots whose pins are all gone to the free stack, and slots a dead
        process reserved for a write (WRITING, its pin reaped). Caller holds the exclusive
        lock, outside any in-place write, so every live split write still pins its slot."""
        states, total = self._slot_state, self._pins.total
        for slot in range(self._capacity or 0):
            state = states[slot]
            if (state == RETIRED or state == WRITING) and not total(slot):
                states[slot] = FREE
                self._free.append(slot)
                if state == RETIRED:
                    self._life[RETIRED_COUNT] -= 1

    def _drop(self, key: int, slot: int) -> None:
        """Remove ``key`` (at ``slot``) from the index; free or retire its slot."""
        del self._index[key]
        self._policy.remove(slot)
        self._life[REMOVED] += 1
        if self._pins[slot]:
            self._slot_state[slot] = RETIRED
            self._life[RETIRED_COUNT] += 1
        else:
            self._slot_state[slot] = FREE
            self._free.append(slot)

    def delete(self, cache_key: int) -> bool:
        """Remove ``cache_key``; return whether it was present."""
        key = check_key(cache_key)
        self._check_open()
        if self._capacity is None:
            return False
        held = self._acquire(True)
        try:
            slot = self._index.get(key)
            if slot is None:
                return False
            self._life[DIRTY] = self._pid
            with self._book:
                self._drop(key, slot)
            self._life[DIRTY] = 0
            return True
        finally:
            held.release()

    def clear(self) -> None:
        """Remove every entry. Slot storage is kept for reuse; counters are kept too."""
        self._check_open()
        if self._capacity is None:
            return
        held = self._acquire(True)
        try:
            self._life[DIRTY] = self._pid
            with self._book:
                for key, slot in list(self._index.items()):
                    self._drop(key, slot)
            self._life[DIRTY] = 0
        finally:
            held.release()

    # -- crash recovery (shared pools) ---------------------------------------------------

    def _recover(self) -> None:
        """Rebuild index, free stack and eviction order from the per-slot truth after a process
        died halfway through a change (caller holds the exclusive lock). A slot that was being
        written in place, or by a split writer now dead, is dropped: a half-written entry is never
        served. A split write in flight (its slot pinned) is left to finish."""
        cap = self._capacity or 0
        states, keys, total = self._slot_state, self._slot_key, self._pins.total
        self._state.reap_dead_workers()
        live: List[int] = []
        seen = set()
        for slot in range(cap):
            if states[slot] == WRITING:
                if not total(slot):  # a pinned one is a live process's split write: left alone
                    states[slot] = FREE
            elif states[slot] == READY:
                if keys[slot] in seen:  # only if the crash hit between retire and publish
                    states[slot] = FREE
                else:
                    seen.add(keys[slot])
                    live.append(slot)
        self._index.clear()
        for slot in live:
            self._index[keys[slot]] = slot
        self._free.clear()
        retired = 0
        for slot in range(cap - 1, -1, -1):
            if states[slot] == FREE:
                self._free.append(slot)
            elif states[slot] == RETIRED:
                retired += 1
        self._policy.rebuild(live)
        life = self._life
        life[RETIRED_COUNT] = retired
        life[INSERTED] = len(live) + life[EVICTED] + life[REMOVED]
        life[DIRTY] = 0

    def recover(self) -> List[int]:
        """Reclaim what dead worker processes held (pins, half-written slots); return their pids.

        Shared pools also do this on their own: at the next lock acquisition after a crash in
        the middle of a change, and every 0.25 s from a writer. Call it to do it now.
        """
        self._check_open()
        if not self._shared:
            return []
        held = self._acquire(True)
        try:
            dead = self._state.reap_dead_workers()
            with self._book:
                self._sweep_retired()
            return dead
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
            if self._shared:
                self._state.release_worker()
            self._storage = None
        finally:
            held.release()
        if self._shared:
            self._index = {}
            self._state.close()
            self._lock.close()
            if self._owner:
                try:
                    os.unlink(self._data_path)
                except FileNotFoundError:
                    pass
            _shared_pools.discard(self)
        else:
            self._index = {}

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
        self._check_open()
        cap = self._capacity or 0
        if not cap:
            return Occupancy(0, 0, 0, 0, 0, 0)
        held = self._acquire(True)
        try:
            with self._book:
                pins = [self._pins.total(s) for s in range(cap)]
                return Occupancy(cap, len(self._index), len(self._free), self._life[RETIRED_COUNT],
                                 sum(1 for p in pins if p), sum(pins))
        finally:
            held.release()

    def check(self) -> None:
        """Verify the bookkeeping invariants; raise :class:`InvariantError` on the first broken one.

        It takes the exclusive lock, so it may run while other threads and processes work. A
        shared pool first reclaims what dead workers left (pins, slots they were writing).
        """
        self._check_open()
        if self._capacity is None:
            return
        held = self._acquire(True)
        try:
            with self._book:
                if self._shared:
                    self._state.reap_dead_workers()
                    self._sweep_retired()
                self._check_locked()
        finally:
            held.release()

    def _check_locked(self) -> None:
        def require(ok: bool, what: str) -> None:
            if not ok:
                raise InvariantError(f"{self.name}: {what}")

        cap = self._capacity or 0
        states = [self._slot_state[s] for s in range(cap)]
        live = set(self._index.values())
        free = list(self._free)
        require(len(live) == len(self._index), "two keys share a slot")
        require(len(set(free)) == len(free), "a slot is twice on the free list")
        require(all(0 <= s < cap for s in live | set(free)), "slot index out of range")
        require(all(states[s] == READY for s in live), "an indexed slot is not READY")
        require(all(states[s] == FREE for s in free), "a slot on the free list is not FREE")
        counts = {st: states.count(st) for st in (FREE, WRITING, READY, RETIRED)}
        # Outside the exclusive lock the only WRITING slots are split writes in flight (shared
        # pools), each pinned by its writer; the sweep above freed those of dead writers.
        require(all(self._pins[s] > 0 for s in range(cap) if states[s] == WRITING),
                "a slot is WRITING with no writer in flight")
        require(counts[READY] == len(live), "a READY slot is missing from the index")
        require(counts[FREE] == len(free), "a FREE slot is missing from the free list")
        require(counts[RETIRED] == self._life[RETIRED_COUNT], "retired count disagrees with slot states")
        require(len(live) + len(free) + counts[RETIRED] + counts[WRITING] == cap,
                "free + live + retired + writing != capacity")
        for key, slot in self._index.items():
            require(self._slot_key[slot] == key, f"slot {slot} records key {self._slot_key[slot]}, index says {key}")
        require(all(self._pins[s] >= 0 for s in range(cap)), "negative pin count")
        require(all(self._pins[s] == 0 for s in free), "a free slot is pinned")
        order = self._policy.order()
        require(len(order) == len(live) and set(order) == live, "eviction order disagrees with the index")
        life = self._life
        require(life[INSERTED] - life[EVICTED] - life[REMOVED] == len(self._index), "inserted - evicted - removed != len")
        if self._stats_on:
            s = self._stats.snapshot()
            require(min(s.hits, s.misses, s.evictions, s.inserts, s.updates) >= 0, "negative counter")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._index)}/{self._capacity}"
        kind = ", shared" if self._shared else ""
        return f"KVCachePool(name={self.name!r}, {state}, strategy={self._policy_cls.name}{kind})"
