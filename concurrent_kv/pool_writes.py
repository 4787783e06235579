"""The write paths of :class:`~concurrent_kv.pool.KVCachePool`: how a ``set`` reaches its slot.

Two ways, both ending in :meth:`SlotTable.publish <concurrent_kv.slots.SlotTable.publish>`:

* **in place under the lock** (``_set_locked``): the exclusive pool lock is held from taking a
  slot to publishing it, so no reader sees a half-written entry; a rewrite of an unleased key
  reuses its slot;
* **split** (``_set_split``, shared pools with a reader-writer lock): a new key's slot is reserved
  under the lock (WRITING, pinned in this process's row), copied into with no lock held, and
  published under the lock again, so other processes read and write while this one copies.

This is a mixin, not a class of its own: both paths run under the pool's own locks and change its
slot table, storage and in-flight count, so they belong to the pool's object; they live here so
that ``pool.py`` reads as the pool's public API.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from .errors import ClosedError, PoolExhaustedError

if TYPE_CHECKING:
    import threading

    from .locks import Releasable
    from .slots import SlotTable
    from .state import PoolState
    from .storage import SlotStorage

__all__ = ["WritePaths"]


class WritePaths:
    """``KVCachePool``'s write paths (see the module docstring)."""

    # What the pool provides (assembled in KVCachePool._configure and _adopt_state).
    name: str
    _closed: bool
    _timeout: float
    _inflight: int
    _index: Any
    _state: "PoolState"
    _slots: "SlotTable"
    _storage: Optional["SlotStorage"]
    _meta_lock: "threading.Lock"
    _fault: Optional[Callable[[str], None]]

    if TYPE_CHECKING:
        def _acquire(self, write: bool) -> "Releasable": ...

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
            self._end_writes([slot], None)
            raise
        if not self._end_writes([slot], [key], prio, holder):
            raise ClosedError(f"pool {self.name!r} was closed during set")
        return slot

    def _end_writes(self, slots: List[int], keys: Optional[List[int]], prio: float = 0.0,
                    holder: Optional[int] = None) -> bool:
        """Under the exclusive lock, end split writes (one ``set``'s, or a batch's): publish
        ``slots`` as ``keys``' entries, newer than any value stored meanwhile and held by
        ``holder``, or hand them back when there are no keys (the copy failed) or the pool was
        closed meanwhile (close() is waiting). Return whether it published."""
        if not slots:
            return not self._closed
        try:
            held = self._acquire(True)
        except BaseException:
            with self._meta_lock:  # the slots stay pinned until this process closes or exits
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

    def _wait_for_split_writes(self) -> None:
        """Let this process's writes that are copying outside the lock finish (each then
        hands its slot back, seeing the pool closed) before the storage goes away. Bounded by
        the lock timeout: a thread stuck longer loses its write, not the process its memory."""
        deadline = time.monotonic() + self._timeout
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.0005)
