"""Eviction policies: pure slot bookkeeping.

A policy tracks which occupied slots exist and in which order they should be given up. It knows
nothing of keys, tensors or locks: the pool tells it what happened to a slot (``insert``,
``touch``, ``update``, ``remove``) and asks it for a ``victim``. Every structure is preallocated
from an array factory, so a policy allocates nothing per operation (and, given arrays that live in
shared memory, the same code can serve several processes).

Adding a policy: subclass :class:`EvictionPolicy` in this module, decorate it with
:func:`register_policy`, test it.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from enum import Enum
from typing import Callable, Dict, Iterator, List, Optional, Type, Union

import numpy as np

from .cells import ArrayFactory, Cells, list_arrays
from .errors import ConfigError, InvalidPriorityError

__all__ = [
    "EvictionStrategy",
    "EvictionPolicy",
    "FIFOPolicy",
    "LRUPolicy",
    "PriorityPolicy",
    "register_policy",
    "resolve_policy",
    "ArrayFactory",
    "check_priority",
    "Cells",
]


class EvictionStrategy(str, Enum):
    """The built-in eviction strategies (the starting design's enum)."""

    FIFO = "fifo"
    LRU = "lru"
    PRIORITY = "priority"


class EvictionPolicy(ABC):
    """Which occupied slot to give up next. Slots are ints in ``[0, capacity)``."""

    name: str = ""

    def __init__(self, capacity: int, arrays: ArrayFactory = list_arrays) -> None:
        self.capacity = capacity

    @abstractmethod
    def insert(self, slot: int, priority: float) -> None:
        """``slot`` now holds a new entry."""

    @abstractmethod
    def remove(self, slot: int) -> None:
        """``slot`` no longer holds an entry (deleted, evicted or cleared)."""

    def touch(self, slot: int) -> None:
        """``slot``'s entry was read."""

    def update(self, slot: int, priority: float) -> None:
        """``slot``'s entry was rewritten in place."""

    @abstractmethod
    def victim(self, is_pinned: Callable[[int], bool]) -> Optional[int]:
        """The occupied slot to evict next, skipping pinned ones; None if every slot is pinned."""

    @abstractmethod
    def order(self) -> List[int]:
        """Occupied slots, first victim first (for ``check()`` and tests)."""

    @abstractmethod
    def clear(self) -> None:
        """Forget every slot."""

    def rebuild(self, slots: List[int]) -> None:
        """Rebuild the order from per-slot data after a crash left the links torn.

        ``slots`` are the occupied slots; the policy orders them by what it recorded per slot.
        Only shared pools need it (a crashed process can tear their links).
        """
        raise NotImplementedError(f"policy {self.name!r} cannot rebuild its order after a crash")

    @property
    def reads_mutate(self) -> bool:
        """Whether :meth:`touch` changes state (then readers must serialise it)."""
        return type(self).touch is not EvictionPolicy.touch


_POLICIES: Dict[str, Type[EvictionPolicy]] = {}


def register_policy(cls: Type[EvictionPolicy]) -> Type[EvictionPolicy]:
    """Class decorator: make ``cls`` selectable by its ``name`` (in any letter case)."""
    _POLICIES[cls.name.lower()] = cls
    return cls


def resolve_policy(strategy: Union[EvictionStrategy, str, Type[EvictionPolicy]]) -> Type[EvictionPolicy]:
    """Map an :class:`EvictionStrategy`, a name or a policy class to a policy class."""
    if isinstance(strategy, type) and issubclass(strategy, EvictionPolicy):
        return strategy
    if isinstance(strategy, EvictionStrategy):
        return _POLICIES[strategy.value]
    if isinstance(strategy, str) and strategy.lower() in _POLICIES:
        return _POLICIES[strategy.lower()]
    raise ConfigError(
        f"unknown eviction strategy {strategy!r}; expected one of {sorted(_POLICIES)} "
        "or an EvictionPolicy subclass"
    )


class _SlotList:
    """An intrusive doubly linked list of slots over two preallocated arrays (as vLLM's
    ``FreeKVCacheBlockQueue``): O(1) append, unlink and move-to-back, no allocation."""

    def __init__(self, capacity: int, arrays: ArrayFactory) -> None:
        self._sentinel = capacity
        self._next = arrays(capacity + 1, capacity, "i")
        self._prev = arrays(capacity + 1, capacity, "i")

    def push_back(self, slot: int) -> None:
        nxt, prv, head = self._next, self._prev, self._sentinel
        tail = prv[head]
        nxt[tail] = slot
        prv[slot] = tail
        nxt[slot] = head
        prv[head] = slot

    def unlink(self, slot: int) -> None:
        nxt, prv = self._next, self._prev
        before, after = prv[slot], nxt[slot]
        nxt[before] = after
        prv[after] = before

    def move_to_back(self, slot: int) -> None:
        if self._prev[self._sentinel] != slot:
            self.unlink(slot)
            self.push_back(slot)

    def __iter__(self) -> Iterator[int]:
        nxt, head = self._next, self._sentinel
        slot = nxt[head]
        while slot != head:
            yield slot
            slot = nxt[slot]

    def clear(self) -> None:
        self._next[self._sentinel] = self._sentinel
        self._prev[self._sentinel] = self._sentinel


@register_policy
class FIFOPolicy(EvictionPolicy):
    """Evict the oldest insertion. Reads and in-place rewrites keep the order (LightZero's ring)."""

    name = "fifo"

    def __init__(self, capacity: int, arrays: ArrayFactory = list_arrays) -> None:
        super().__init__(capacity, arrays)
        self._list = _SlotList(capacity, arrays)
        # Per-slot stamp (insertion, or last use for LRU): the truth the links are rebuilt from.
        self._stamp = arrays(capacity, 0, "i")
        self._clock = arrays(1, 0, "i")

    def _stamp_now(self, slot: int) -> None:
        clock = self._clock
        clock[0] += 1
        self._stamp[slot] = clock[0]

    def insert(self, slot: int, priority: float) -> None:
        self._stamp_now(slot)
        self._list.push_back(slot)

    def remove(self, slot: int) -> None:
        self._list.unlink(slot)

    def victim(self, is_pinned: Callable[[int], bool]) -> Optional[int]:
        for slot in self._list:
            if not is_pinned(slot):
                return slot
        return None

    def order(self) -> List[int]:
        return list(self._list)

    def clear(self) -> None:
        self._list.clear()

    def rebuild(self, slots: List[int]) -> None:
        self._list.clear()
        for slot in sorted(slots, key=self._stamp.__getitem__):
            self._list.push_back(slot)


@register_policy
class LRUPolicy(FIFOPolicy):
    """Evict the least recently used entry; a read or a rewrite makes an entry most recent."""

    name = "lru"

    def touch(self, slot: int) -> None:
        self._stamp_now(slot)
        self._list.move_to_back(slot)

    def update(self, slot: int, priority: float) -> None:
        self._stamp_now(slot)
        self._list.move_to_back(slot)


@register_policy
class PriorityPolicy(EvictionPolicy):
    """Evict the lowest priority; ties go to the oldest insertion. A rewrite sets the new
    priority; reads change nothing. An indexed binary heap: O(log n) per operation."""

    name = "priority"

    def __init__(self, capacity: int, arrays: ArrayFactory = list_arrays) -> None:
        super().__init__(capacity, arrays)
        self._heap = arrays(capacity, -1, "i")  # heap position -> slot
        self._pos = arrays(capacity, -1, "i")  # slot -> heap position, -1 when absent
        self._prio = arrays(capacity, 0.0, "f")
        self._seq = arrays(capacity, 0, "i")  # insertion counter, breaks ties FIFO
        self._counts = arrays(2, 0, "i")  # [heap size, insertion clock]

    @property
    def _size(self) -> int:
        return self._counts[0]

    @_size.setter
    def _size(self, value: int) -> None:
        self._counts[0] = value

    def _less(self, a: int, b: int) -> bool:
        pa, pb = self._prio[a], self._prio[b]
        return pa < pb or (pa == pb and self._seq[a] < self._seq[b])

    def _place(self, i: int, slot: int) -> None:
        self._heap[i] = slot
        self._pos[slot] = i

    def _sift_up(self, i: int) -> None:
        heap = self._heap
        slot = heap[i]
        while i > 0:
            parent = (i - 1) >> 1
            if not self._less(slot, heap[parent]):
                break
            self._place(i, heap[parent])
            i = parent
        self._place(i, slot)

    def _sift_down(self, i: int) -> None:
        heap, n = self._heap, self._size
        slot = heap[i]
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and self._less(heap[child + 1], heap[child]):
                child += 1
            if not self._less(heap[child], slot):
                break
            self._place(i, heap[child])
            i = child
        self._place(i, slot)

    def insert(self, slot: int, priority: float) -> None:
        self._prio[slot] = float(priority)
        self._seq[slot] = self._counts[1]
        self._counts[1] += 1
        self._place(self._size, slot)
        self._size += 1
        self._sift_up(self._size - 1)

    def remove(self, slot: int) -> None:
        i = self._pos[slot]
        self._pos[slot] = -1
        self._size -= 1
        if i == self._size:
            return
        last = self._heap[self._size]
        self._place(i, last)
        self._sift_up(i)
        self._sift_down(self._pos[last])

    def update(self, slot: int, priority: float) -> None:
        self._prio[slot] = float(priority)
        i = self._pos[slot]
        self._sift_up(i)
        self._sift_down(self._pos[slot])

    def victim(self, is_pinned: Callable[[int], bool]) -> Optional[int]:
        if self._size == 0:
            return None
        root = self._heap[0]
        if not is_pinned(root):
            return root
        # Best-first walk below the pinned entries: O(p log p) for p pinned slots.
        frontier = [(self._prio[root], self._seq[root], 0)]
        while frontier:
            _, _, i = heapq.heappop(frontier)
            slot = self._heap[i]
            if not is_pinned(slot):
                return slot
            for child in (2 * i + 1, 2 * i + 2):
                if child < self._size:
                    c = self._heap[child]
                    heapq.heappush(frontier, (self._prio[c], self._seq[c], child))
        return None

    def order(self) -> List[int]:
        slots = [self._heap[i] for i in range(self._size)]
        return sorted(slots, key=lambda s: (self._prio[s], self._seq[s]))

    def clear(self) -> None:
        for i in range(self._size):
            self._pos[self._heap[i]] = -1
        self._size = 0

    def rebuild(self, slots: List[int]) -> None:
        for slot in range(self.capacity):
            self._pos[slot] = -1
        self._size = 0
        for i, slot in enumerate(sorted(slots, key=lambda s: (self._prio[s], self._seq[s]))):
            self._place(i, slot)  # a sorted array is a valid heap
        self._size = len(slots)


def check_priority(priority: object) -> float:
    """Return ``priority`` as a finite float, or raise :class:`InvalidPriorityError`."""
    if isinstance(priority, (bool, np.bool_)) or not isinstance(priority, (int, float, np.integer, np.floating)):
        raise InvalidPriorityError(
            f"priority must be a finite real number, got {type(priority).__name__}: {priority!r}"
        )
    try:
        value = float(priority)
    except OverflowError:  # an int beyond float range
        raise InvalidPriorityError(f"priority must be finite, got an int too large for a float: {priority!r:.40}") from None
    if not math.isfinite(value):
        raise InvalidPriorityError(f"priority must be finite, got {value}")
    return value
