"""``KVCachePool``: a fixed number of preallocated slots behind a key index.

A pool is handed its pieces and only orchestrates them: a key index (``dict`` key -> slot), an
eviction policy (:mod:`concurrent_kv.eviction`), slot storage (:mod:`concurrent_kv.storage`), a
lock (:mod:`concurrent_kv.locks`) and counters (:mod:`concurrent_kv.stats`).

Locking, in two levels:

* the **pool lock** (reader-writer by default) guards slot *contents* and the index: ``get``
  copies out under a shared hold, so readers copy in parallel; ``set``/``delete``/``clear`` hold
  it exclusively;
* the **bookkeeping lock** (a ``threading.Lock`` held for a few dict/list operations) guards what
  readers and lease exits change: counters, LRU recency, pin counts, the free list.

Leases pin a slot: a pinned slot is never evicted nor overwritten. Rewriting a leased key writes
the new value to another slot; deleting or clearing it *retires* the slot, which returns to the
free list when the last lease ends.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

from .entry import EntrySpec, KeysValues
from .errors import ClosedError, ConfigError, EntryMismatchError, InvariantError, PoolExhaustedError
from .eviction import EvictionPolicy, EvictionStrategy, check_priority, resolve_policy
from .keys import check_key
from .locks import PoolLock, make_lock
from .stats import CacheStats, StatsSnapshot
from .storage import SlotStorage

__all__ = ["KVCachePool", "Lease"]

StrategyLike = Union[EvictionStrategy, str, Type[EvictionPolicy]]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return float(value)


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
    (or of ``entry_spec`` at once); later entries must match them.
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
    ) -> None:
        if (pool_size is None) == (max_bytes is None):
            raise ConfigError("give exactly one of pool_size (slots) or max_bytes")
        if pool_size is not None:
            _positive_int("pool_size", pool_size)
        if max_bytes is not None:
            _positive_int("max_bytes", max_bytes)
        if not isinstance(enable_stats, bool):
            raise ConfigError(f"enable_stats must be a bool, got {enable_stats!r}")
        if not isinstance(name, str):
            raise ConfigError(f"name must be a str, got {type(name).__name__}")
        if entry_spec is not None and not isinstance(entry_spec, EntrySpec):
            raise ConfigError(f"entry_spec must be an EntrySpec, got {type(entry_spec).__name__}")
        self._policy_cls = resolve_policy(eviction_strategy)
        self.eviction_strategy = eviction_strategy
        self.name = name
        self._timeout = _positive_float("lock_timeout", lock_timeout)
        self._lock = make_lock(lock, name)
        self._book = threading.Lock()
        self._max_bytes = max_bytes
        self._capacity: Optional[int] = pool_size
        self._stats_on = enable_stats
        self._stats = CacheStats()
        self._closed = False
        self._spec: Optional[EntrySpec] = None
        self._storage: Optional[SlotStorage] = None
        self._index: Dict[int, int] = {}
        # Lifetime counters (never reset) behind check(): inserted - evicted - removed == len.
        self._inserted = self._evicted = self._removed = 0
        if pool_size is not None:
            self._allocate_metadata(pool_size)
        if entry_spec is not None:
            self._format(entry_spec)

    # -- set-up ---------------------------------------------------------------------------

    def _allocate_metadata(self, capacity: int) -> None:
        self._capacity = capacity
        self._policy = self._policy_cls(capacity)
        self._read_books = self._stats_on or self._policy.reads_mutate
        self._slot_key: List[Optional[int]] = [None] * capacity
        self._pins = [0] * capacity
        self._free = list(range(capacity - 1, -1, -1))  # a stack; slot 0 is used first
        self._retired: Set[int] = set()

    def _format(self, spec: EntrySpec) -> None:
        """Allocate slot storage for entries of ``spec`` (once)."""
        if self._capacity is None:
            assert self._max_bytes is not None
            capacity = self._max_bytes // spec.nbytes
            if capacity == 0:
                raise EntryMismatchError(f"one entry takes {spec.nbytes} bytes, more than max_bytes={self._max_bytes}")
            self._allocate_metadata(capacity)
        assert self._capacity is not None
        self._storage = SlotStorage(spec, self._capacity)
        self._spec = spec

    # -- properties ----------------------------------------------------------------------

    @property
    def capacity(self) -> Optional[int]:
        """Number of slots (None until the first entry when sized by ``max_bytes``)."""
        return self._capacity

    pool_size = capacity  # LightZero's name

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
        """An immutable, consistent copy of the counters."""
        with self._book:
            return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (entries are kept)."""
        with self._book:
            self._stats.reset()

    # -- reads ---------------------------------------------------------------------------

    def get(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """A private deep copy of the entry under ``cache_key``, or None on a miss.

        With ``out`` (an entry of the pool's shape), the data is copied into it and ``out`` is
        returned, so steady-state reads allocate no tensor.
        """
        key = check_key(cache_key)
        self._check_open()
        if out is not None:
            self._check_entry(out)
        held = self._lock.acquire_read(self._timeout)
        try:
            slot = self._index.get(key)
            if self._read_books:
                with self._book:
                    if slot is None:
                        self._stats.misses += self._stats_on
                        return None
                    self._stats.hits += self._stats_on
                    self._policy.touch(slot)
            elif slot is None:
                return None
            assert self._storage is not None
            return self._storage.read(slot, out)
        finally:
            held.release()

    def lease(self, cache_key: int) -> Lease:
        """``with pool.lease(key) as kv:`` a zero-copy view, pinned until the block exits.

        ``kv`` is None on a miss. While pinned, the slot is never evicted or overwritten: a
        ``set`` of the same key stores the new value in another slot.
        """
        key = check_key(cache_key)
        self._check_open()
        return Lease(self, key)

    def _pin(self, key: int) -> int:
        self._check_open()
        held = self._lock.acquire_read(self._timeout)
        try:
            slot = self._index.get(key)
            with self._book:
                if slot is None:
                    if self._stats_on:
                        self._stats.misses += 1
                    return -1
                if self._stats_on:
                    self._stats.hits += 1
                self._policy.touch(slot)
                self._pins[slot] += 1
                return slot
        finally:
            held.release()

    def _storage_view(self, slot: int) -> KeysValues:
        assert self._storage is not None
        return self._storage.view(slot)

    def _unpin(self, slot: int) -> None:
        with self._book:
            self._pins[slot] -= 1
            if self._pins[slot] == 0 and slot in self._retired:
                self._retired.discard(slot)
                self._free.append(slot)

    def __contains__(self, cache_key: object) -> bool:
        self._check_open()
        return check_key(cache_key) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> List[int]:
        """The keys stored now (a snapshot)."""
        self._check_open()
        held = self._lock.acquire_read(self._timeout)
        try:
            return list(self._index)
        finally:
            held.release()

    # -- writes --------------------------------------------------------------------------

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
        held = self._lock.acquire_write(self._timeout)
        try:
            self._check_open()
            if self._spec is None:
                self._format(spec)
            elif spec != self._spec:  # another thread formatted the pool first
                self._spec.check(kv_cache)
            old = self._index.get(key)
            with self._book:
                in_place = old is not None and self._pins[old] == 0
                slot = old if in_place else self._take_slot()
            assert self._storage is not None and slot is not None
            try:
                self._storage.write(slot, data, sizes)
            except BaseException:
                with self._book:
                    if in_place:
                        self._drop(key, slot)  # never serve a half-written entry
                    else:
                        self._free.append(slot)
                raise
            with self._book:
                if in_place:
                    self._policy.update(slot, prio)
                    self._stats.updates += self._stats_on
                    return slot
                if old is not None:  # the old value is leased: retire its slot
                    self._drop(key, old)
                    self._stats.updates += self._stats_on
                else:
                    self._stats.inserts += self._stats_on
                self._index[key] = slot
                self._slot_key[slot] = key
                self._policy.insert(slot, prio)
                self._inserted += 1
                return slot
        finally:
            held.release()

    def _take_slot(self) -> int:
        """A free slot, else the policy's unpinned victim (evicted here). Caller holds both locks."""
        if self._free:
            return self._free.pop()
        victim = self._policy.victim(self._pins.__getitem__)
        if victim is None:
            raise PoolExhaustedError(f"{self.name}: all {self._capacity} slots are pinned by leases")
        old_key = self._slot_key[victim]
        assert old_key is not None
        del self._index[old_key]
        self._slot_key[victim] = None
        self._policy.remove(victim)
        self._evicted += 1
        self._stats.evictions += self._stats_on
        return victim

    def _drop(self, key: int, slot: int) -> None:
        """Remove ``key`` (at ``slot``) from the index; free or retire its slot. Both locks held."""
        del self._index[key]
        self._slot_key[slot] = None
        self._policy.remove(slot)
        self._removed += 1
        if self._pins[slot]:
            self._retired.add(slot)
        else:
            self._free.append(slot)

    def delete(self, cache_key: int) -> bool:
        """Remove ``cache_key``; return whether it was present."""
        key = check_key(cache_key)
        self._check_open()
        held = self._lock.acquire_write(self._timeout)
        try:
            slot = self._index.get(key)
            if slot is None:
                return False
            with self._book:
                self._drop(key, slot)
            return True
        finally:
            held.release()

    def clear(self) -> None:
        """Remove every entry. Slot storage is kept for reuse; counters are kept too."""
        self._check_open()
        held = self._lock.acquire_write(self._timeout)
        try:
            with self._book:
                for key, slot in list(self._index.items()):
                    self._drop(key, slot)
        finally:
            held.release()

    # -- lifecycle -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"pool {self.name!r} is closed")

    def close(self) -> None:
        """Drop every entry and release the slot storage. Idempotent."""
        if self._closed:
            return
        held = self._lock.acquire_write(self._timeout)
        try:
            self._closed = True
            self._index.clear()
            self._storage = None
        finally:
            held.release()

    def __enter__(self) -> "KVCachePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> None:
        """Verify the bookkeeping invariants; raise :class:`InvariantError` on the first broken one.

        Meant for quiescent points (tests, after stress runs): it takes the write lock.
        """
        self._check_open()
        held = self._lock.acquire_write(self._timeout)
        try:
            with self._book:
                self._check_locked()
        finally:
            held.release()

    def _check_locked(self) -> None:
        def require(ok: bool, what: str) -> None:
            if not ok:
                raise InvariantError(f"{self.name}: {what}")

        if self._capacity is None:
            require(not self._index, "entries in an unsized pool")
            return
        cap = self._capacity
        live = set(self._index.values())
        free, retired = set(self._free), self._retired
        require(len(live) == len(self._index), "two keys share a slot")
        require(len(free) == len(self._free), "a slot is twice on the free list")
        require(not (live & free) and not (live & retired) and not (free & retired), "a slot is in two states")
        require(len(live) + len(free) + len(retired) == cap, "free + live + retired != capacity")
        require(all(0 <= s < cap for s in live | free | retired), "slot index out of range")
        for key, slot in self._index.items():
            require(self._slot_key[slot] == key, f"slot {slot} records key {self._slot_key[slot]}, index says {key}")
        require(all(self._slot_key[s] is None for s in free | retired), "a free or retired slot records a key")
        require(all(p >= 0 for p in self._pins), "negative pin count")
        require(all(self._pins[s] == 0 for s in free), "a free slot is pinned")
        require(all(self._pins[s] > 0 for s in retired), "a retired slot is not pinned")
        order = self._policy.order()
        require(len(order) == len(live) and set(order) == live, "eviction order disagrees with the index")
        require(self._inserted - self._evicted - self._removed == len(self._index), "inserted - evicted - removed != len")
        if self._stats_on:
            s = self._stats
            require(min(s.hits, s.misses, s.evictions, s.inserts, s.updates) >= 0, "negative counter")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._index)}/{self._capacity}"
        return f"KVCachePool(name={self.name!r}, {state}, strategy={self._policy_cls.name})"
