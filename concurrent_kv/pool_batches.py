"""The batched calls of :class:`~concurrent_kv.pool.KVCachePool`: many keys, one lock acquisition.

* ``lookup_many`` pins every hit of a batch under one read lock (a batch that misses entirely in
  an in-process pool takes no lock at all); ``get_many`` copies the hits out in one tensor op;
* ``write_many`` reserves a slot per key under one lock (WRITING, pinned), for the caller to
  copy into and :meth:`WriteBatch.commit <concurrent_kv.batch.WriteBatch.commit>` to publish
  (``WritePaths._end_writes``, the same end as a single split ``set``);
* ``set_many`` copies a batch in: in process, reserved, copied and published under one hold
  of the lock (as ``set`` does in place); in a split-writing shared pool through ``write_many``,
  so other processes are not blocked by the copy.

A mixin, as ``pool_writes.py`` is: these calls run under the pool's own locks and change its slot
table and counters. The batch objects and the batch checks are in ``batch.py``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch

from .batch import PinnedBatch, SizesLike, WriteBatch, check_keys, check_sizes, entries_data
from .checks import boolean, instance_of
from .entry import EntrySpec
from .errors import EntryMismatchError, PoolExhaustedError
from .eviction import check_priority
from .stats import HITS, MISSES

if TYPE_CHECKING:
    import threading

    from .eviction import EvictionPolicy
    from .locks import Releasable
    from .slots import SlotTable
    from .storage import SlotStorage

__all__ = ["BatchPaths"]


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


class BatchPaths:
    """``KVCachePool``'s batched calls (see the module docstring)."""

    # What the pool provides (assembled in KVCachePool._configure and _adopt_state).
    name: str
    _timeout: float
    _inflight: int
    _index: Any
    _capacity: Optional[int]
    _shared: bool
    _split_writes: bool
    _read_exclusive: bool
    _touch_on_read: bool
    _stats_on: int
    _counters: Any
    _own_pins: Any
    _policy: "EvictionPolicy"
    _slots: "SlotTable"
    _spec: Optional[EntrySpec]
    _storage: Optional["SlotStorage"]
    _meta_lock: "threading.Lock"

    if TYPE_CHECKING:
        def _acquire(self, write: bool) -> "Releasable": ...
        def _start_call(self) -> None: ...
        def _check_holder(self, holder: Any) -> None: ...
        def _check_not_closed(self, during: str) -> None: ...
        def _allocate_storage(self, spec: EntrySpec) -> None: ...

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
        if self._capacity is None or (not self._shared and (
                keys[0] not in index if len(keys) == 1 else _none_in(keys, index))):
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
        keys, prio = self._check_batch_call(cache_keys, priority, holder, partial, entry_spec)
        spec = self._batch_spec(entry_spec)
        rows = check_sizes(sizes, len(keys), 2 * spec.num_layers, spec.max_tokens)
        return self._reserve_batch(keys, rows, spec, prio, holder, partial)

    def _batch_spec(self, given: Optional[EntrySpec]) -> EntrySpec:
        """The shape a batch is written in: the pool's slots, or ``given`` for a pool with none yet."""
        spec = self._spec if self._spec is not None else given
        if spec is None:
            raise EntryMismatchError(f"pool {self.name!r} has no slots yet: pass entry_spec= (or set one entry)")
        if given is not None and given is not spec and given != spec:
            raise EntryMismatchError(f"entry_spec {given} differs from the pool's slots {spec}")
        return spec

    def _check_batch_call(self, cache_keys: Sequence[int], priority: Optional[float], holder: Optional[int],
                          partial: bool, entry_spec: Optional[EntrySpec]) -> Tuple[List[int], float]:
        """The checks every batched write starts with: the keys (as plain ints) and the priority."""
        keys = check_keys(cache_keys)
        prio = 0.0 if priority is None else check_priority(priority)
        boolean("partial", partial)
        if entry_spec is not None:
            instance_of("entry_spec", entry_spec, EntrySpec)
        self._start_call()
        if holder is not None:
            self._check_holder(holder)
        return keys, prio

    def _reserve_batch(self, keys: List[int], rows: List[Tuple[int, ...]], spec: EntrySpec, prio: float,
                       holder: Optional[int], partial: bool) -> WriteBatch:
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
        keys, prio = self._check_batch_call(cache_keys, priority, holder, partial, entry_spec)
        spec, data, rows = entries_data(self._spec or entry_spec, entries, sizes, len(keys))
        return self._store_many(keys, spec, data, rows, prio, holder, partial)

    def _store_many(self, keys: List[int], spec: Optional[EntrySpec], data: List[Any], rows: List[Tuple[int, ...]],
                    prio: float, holder: Optional[int], partial: bool) -> List[int]:
        """set_many past its checks: ``data[i]`` is entry ``i``'s block (or token prefix) or its
        tensors, ``rows[i]`` its token counts, all of ``spec`` (callers that build their views
        from the pool's own spec, as the batched seam does, enter here)."""
        own = self._spec
        if own is not None and (spec is own or spec == own) and not self._split_writes and len(set(keys)) == len(keys):
            # In process: reserve, copy and publish under one hold of the lock, as set does.
            return self._set_many_locked(keys, data, rows, prio, holder, partial)
        batch = self._reserve_batch(keys, rows, self._batch_spec(spec), prio, holder, partial)
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
