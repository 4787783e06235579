"""The slot lifecycle of one pool: which slot holds which key, and how a slot moves between states.

::

    FREE --take/reserve--> WRITING --publish--> READY --drop (pinned)--> RETIRED
      ^                       |                   |                        |
      +------give_back--------+                   +--drop/evict (unpinned)-+--sweep (unpinned)--> FREE

    A holder's ``let_go`` drops the READY entries that no one else holds.

:class:`SlotTable` makes every such move over a :class:`~concurrent_kv.state.PoolState` (in process
or shared memory). It holds no lock and touches no tensor: the pool calls it under its exclusive
lock (and its metadata lock where readers could race), and copies the data itself.

Invariants, kept by every method here and verified by :meth:`SlotTable.audit`:

* a READY slot is in the index under its ``slot_key``, and in the policy's order; no other is;
* a FREE slot is on the free stack exactly once and unpinned;
* a RETIRED slot is counted in ``scalars[RETIRED_COUNT]``;
* outside a change, a WRITING slot is pinned by the split writer that reserved it;
* ``INSERTED - EVICTED - REMOVED`` equals the number of keys;
* only READY slots are held; a slot's hold count is the number of holder rows that hold it, and
  a held slot is never evicted (:meth:`SlotTable.take` skips it like a leased one).

Every change runs inside :meth:`SlotTable.changing`: it marks the pool DIRTY, so a process killed
in the middle leaves the next lock holder the work of :meth:`SlotTable.rebuild`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .errors import InvariantError, PoolExhaustedError
from .state import (
    DIRTY, EVICTED, FREE, INSERTED, LAST_REAP_NS, READY, REMOVED, RETIRED, RETIRED_COUNT, WRITING,
    PoolState,
)
from .stats import EVICTIONS, INSERTS, UPDATES

__all__ = ["SlotTable", "Occupancy", "REAP_INTERVAL_NS"]

#: How often a writer of a shared pool looks for dead workers whose pins must be reclaimed.
REAP_INTERVAL_NS = 250_000_000


@dataclass(frozen=True)
class Occupancy:
    """How a pool's slots are used at one instant (see :meth:`KVCachePool.occupancy`)."""

    capacity: int
    live: int  # slots holding an entry
    free: int  # slots ready for reuse
    retired: int  # slots whose entry was removed while leased, reused once unpinned
    pinned: int  # slots with at least one lease
    pins: int  # leases held, over all processes
    held: int = 0  # slots held by at least one collector (see KVCachePool.add_holder)


class _Change:
    """The DIRTY bracket, as a reusable context manager (cheaper than a generator on hot paths).

    On a normal exit or an exception the change is over (every method here leaves the state
    consistent before raising); only a process killed inside it leaves the mark set."""

    __slots__ = ("_table",)

    def __init__(self, table: "SlotTable") -> None:
        self._table = table

    def __enter__(self) -> None:
        self._table.state.scalars[DIRTY] = self._table.pid

    def __exit__(self, *exc: object) -> None:
        self._table.state.scalars[DIRTY] = 0


class SlotTable:
    """The slot state machine of one pool over its metadata ``state``."""

    def __init__(self, state: PoolState, name: str, count_stats: bool, pid: int) -> None:
        self.state = state
        self.name = name
        self.count_stats = count_stats  # 1 or 0, added to counters so a disabled pool counts nothing
        self.pid = pid  # marks DIRTY; the pool updates it in a forked child
        self.changing = _Change(self)

    @property
    def dirty(self) -> bool:
        """Whether a process died in the middle of a change (the next lock holder rebuilds)."""
        return bool(self.state.scalars[DIRTY])

    # -- taking slots ----------------------------------------------------------------------

    def take(self, keep: Optional[int] = None) -> int:
        """A free slot, else the policy's unpinned victim other than ``keep`` (evicted here)."""
        st = self.state
        free = st.free
        if st.shared and time.monotonic_ns() - st.scalars[LAST_REAP_NS] > REAP_INTERVAL_NS:
            if st.reap_dead_workers():
                self.sweep()  # their half-copied slots too
        if not free and st.scalars[RETIRED_COUNT]:
            self.sweep()
        if free:
            return free.pop()
        total, held = st.pins.total, st.holds.count

        def is_pinned(slot: int) -> object:  # leased, held by a collector, or the one to keep
            return slot == keep or held[slot] or total(slot)

        victim = st.policy.victim(is_pinned)  # type: ignore[arg-type]  # truthy pin counts
        if victim is None and st.shared:  # maybe the pins belong to a dead worker
            st.reap_dead_workers()
            self.sweep()
            if free:
                return free.pop()
            victim = st.policy.victim(is_pinned)  # type: ignore[arg-type]
        if victim is None:
            raise PoolExhaustedError(f"{self.name}: all {st.capacity} slots are pinned by leases or held")
        del st.index[st.slot_key[victim]]
        st.slot_state[victim] = FREE
        st.policy.remove(victim)
        st.scalars[EVICTED] += 1
        st.stats.counters[EVICTIONS] += self.count_stats
        return victim

    def can_take(self, count: int) -> bool:
        """Whether ``count`` slots can be taken now (free, retired and unpinned, or evictable),
        so that a batch is refused before anything is evicted. O(capacity) only when the free
        stack alone is too short."""
        st = self.state
        if len(st.free) >= count:
            return True
        if st.shared:
            st.reap_dead_workers()
        if st.scalars[RETIRED_COUNT] or st.shared:
            self.sweep()
        total, held = st.pins.total, st.holds.count
        spare = sum(1 for slot in st.index.values() if not held[slot] and not total(slot))
        return len(st.free) + spare >= count

    def reserve(self) -> int:
        """Take a slot for a split write: WRITING and pinned in this process's row, so no one
        else serves, evicts or frees it while it is copied into outside the lock."""
        slot = self.take()
        self.state.pins.own[slot] += 1
        self.state.slot_state[slot] = WRITING
        return slot

    def reserve_many(self, count: int) -> List[int]:
        """Up to ``count`` slots reserved as :meth:`reserve` does, fewer when the rest cannot be
        freed (pinned or held). One call per batch: the loop is the hot path of batched stores."""
        st = self.state
        free, own, states = st.free, st.pins.own, st.slot_state
        got: List[int] = []
        try:
            for _ in range(count):
                slot = free.pop() if free and not st.shared else self.take()  # take: sweeps, reaps
                own[slot] += 1
                states[slot] = WRITING
                got.append(slot)
        except PoolExhaustedError:
            pass
        return got

    def publish_many(self, keys: List[int], slots: List[int], priority: float, holder: Optional[int]) -> None:
        """End split writes: each slot of :meth:`reserve_many` published as its key's entry (as
        :meth:`unreserve` then :meth:`publish`), held by ``holder`` when given."""
        own = self.state.pins.own
        for key, slot in zip(keys, slots):
            own[slot] -= 1
            self.publish(key, slot, priority)
        if holder is not None:
            self.hold_many(slots, holder)

    def unreserve(self, slot: int) -> None:
        """The split write of ``slot`` is over: drop its pin (then :meth:`publish` or :meth:`give_back`)."""
        self.state.pins.own[slot] -= 1

    def writing(self, slot: int, key: int) -> None:
        """``slot`` is about to be written in place under the lock for ``key``."""
        self.state.slot_state[slot] = WRITING
        self.state.slot_key[slot] = key

    def any_writing(self) -> bool:
        """Whether some split write is in flight (its slot will come back within microseconds)."""
        states = self.state.slot_state
        return any(states[s] == WRITING for s in range(self.state.capacity))

    # -- publishing and dropping -------------------------------------------------------------

    def publish(self, key: int, slot: int, priority: float) -> None:
        """``slot`` now holds ``key``'s entry, newer than any stored before (whose slot is
        dropped: retired if leased)."""
        st = self.state
        old = st.index.get(key)
        if old is not None:
            self._move_holds(old, slot)  # the new value is the one its holders keep
            self.drop(key, old)
            st.stats.counters[UPDATES] += self.count_stats
        else:
            st.stats.counters[INSERTS] += self.count_stats
        st.slot_key[slot] = key
        st.index[key] = slot
        st.slot_state[slot] = READY
        st.policy.insert(slot, priority)
        st.scalars[INSERTED] += 1

    def republish(self, slot: int, priority: float) -> None:
        """``slot``'s entry was rewritten in place: READY again, with its new priority."""
        st = self.state
        st.slot_state[slot] = READY
        st.policy.update(slot, priority)
        st.stats.counters[UPDATES] += self.count_stats

    def give_back(self, slot: int) -> None:
        """Hand a WRITING slot that was never published back to the free stack."""
        self.state.slot_state[slot] = FREE
        self.state.free.append(slot)

    def drop(self, key: int, slot: int) -> None:
        """Remove ``key`` (at ``slot``) from the index; free or retire its slot."""
        st = self.state
        del st.index[key]
        st.policy.remove(slot)
        st.scalars[REMOVED] += 1
        if st.holds.count[slot]:
            self._move_holds(slot, None)
        if st.pins.total(slot):
            st.slot_state[slot] = RETIRED
            st.scalars[RETIRED_COUNT] += 1
        else:
            st.slot_state[slot] = FREE
            st.free.append(slot)

    def drop_all(self) -> None:
        """Remove every key."""
        for key, slot in list(self.state.index.items()):
            self.drop(key, slot)

    # -- holds -----------------------------------------------------------------------------

    def hold(self, slot: int, holder: int) -> None:
        """``holder`` keeps ``slot``'s entry (a READY slot) until it lets go."""
        self.hold_many((slot,), holder)

    def hold_many(self, slots: Sequence[int], holder: int) -> None:
        """``holder`` keeps each of ``slots``' entries (READY slots) until it lets go."""
        holds = self.state.holds
        row, count = holds.row(holder), holds.count
        for slot in slots:
            if not row[slot]:
                row[slot] = 1
                count[slot] += 1

    def let_go(self, holder: int) -> int:
        """Release every hold of ``holder``; entries nobody holds any more are removed, as a
        clear would remove them for that holder alone. Return how many were removed."""
        st = self.state
        row, count, keys = st.holds.row(holder), st.holds.count, st.slot_key
        removed = 0
        for slot in range(st.capacity):
            if row[slot]:
                row[slot] = 0
                count[slot] -= 1
                if not count[slot]:
                    self.drop(keys[slot], slot)
                    removed += 1
        return removed

    def _move_holds(self, src: int, dst: Optional[int]) -> None:
        """Give ``src``'s holders to ``dst`` (a new slot of the same key), or drop them."""
        holds = self.state.holds
        for h in holds.holders_of(src):
            row = holds.row(h)
            row[src] = 0
            if dst is not None and not row[dst]:
                row[dst] = 1
                holds.count[dst] += 1
        holds.count[src] = 0

    def _reap_dead_holders(self) -> None:
        holds = self.state.holds
        for h in holds.dead():
            self.let_go(h)
            holds.pid[h] = 0

    # -- reclaiming --------------------------------------------------------------------------

    def sweep(self) -> None:
        """Return retired slots whose pins are all gone to the free stack, and slots a dead
        process reserved for a write (WRITING, its pin reaped). Called under the exclusive lock,
        outside any in-place write, so every live split write still pins its slot."""
        st = self.state
        states, total = st.slot_state, st.pins.total
        for slot in range(st.capacity):
            state = states[slot]
            if (state == RETIRED or state == WRITING) and not total(slot):
                states[slot] = FREE
                st.free.append(slot)
                if state == RETIRED:
                    st.scalars[RETIRED_COUNT] -= 1

    def reap(self) -> List[int]:
        """Drop the pins and holds of dead worker processes and reclaim their slots; return
        their pids."""
        dead = self.state.reap_dead_workers()
        self._reap_dead_holders()
        self.sweep()
        return dead

    def rebuild(self) -> None:
        """Rebuild index, free stack and eviction order from the per-slot truth after a process
        died halfway through a change. A slot that was being written in place, or by a split
        writer now dead, is dropped: a half-written entry is never served. A split write in
        flight (its slot pinned) is left to finish."""
        st = self.state
        cap, states, keys, total = st.capacity, st.slot_state, st.slot_key, st.pins.total
        st.reap_dead_workers()
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
        st.index.clear()
        for slot in live:
            st.index[keys[slot]] = slot
        st.free.clear()
        retired = 0
        for slot in range(cap - 1, -1, -1):
            if states[slot] == FREE:
                st.free.append(slot)
            elif states[slot] == RETIRED:
                retired += 1
        st.policy.rebuild(live)
        holds, ready = st.holds, set(live)
        for slot in range(cap):
            holders = holds.holders_of(slot)
            if slot not in ready:
                for h in holders:
                    holds.row(h)[slot] = 0
                holders = []
            holds.count[slot] = len(holders)
        scalars = st.scalars
        scalars[RETIRED_COUNT] = retired
        scalars[INSERTED] = len(live) + scalars[EVICTED] + scalars[REMOVED]
        scalars[DIRTY] = 0

    # -- reading the table -------------------------------------------------------------------

    def occupancy(self) -> Occupancy:
        st = self.state
        pins = [st.pins.total(s) for s in range(st.capacity)]
        held = sum(1 for s in range(st.capacity) if st.holds.count[s])
        return Occupancy(st.capacity, len(st.index), len(st.free), st.scalars[RETIRED_COUNT],
                         sum(1 for p in pins if p), sum(pins), held)

    def audit(self) -> None:
        """Verify the invariants above; raise :class:`InvariantError` on the first broken one."""
        def require(ok: bool, what: str) -> None:
            if not ok:
                raise InvariantError(f"{self.name}: {what}")

        st = self.state
        cap, pins, index = st.capacity, st.pins, st.index
        states = [st.slot_state[s] for s in range(cap)]
        live = set(index.values())
        free = list(st.free)
        require(len(live) == len(index), "two keys share a slot")
        require(len(set(free)) == len(free), "a slot is twice on the free list")
        require(all(0 <= s < cap for s in live | set(free)), "slot index out of range")
        require(all(states[s] == READY for s in live), "an indexed slot is not READY")
        require(all(states[s] == FREE for s in free), "a slot on the free list is not FREE")
        counts = {state: states.count(state) for state in (FREE, WRITING, READY, RETIRED)}
        # Outside the exclusive lock the only WRITING slots are split writes in flight (shared
        # pools), each pinned by its writer; a sweep frees those of dead writers.
        require(all(pins[s] > 0 for s in range(cap) if states[s] == WRITING),
                "a slot is WRITING with no writer in flight")
        require(counts[READY] == len(live), "a READY slot is missing from the index")
        require(counts[FREE] == len(free), "a FREE slot is missing from the free list")
        require(counts[RETIRED] == st.scalars[RETIRED_COUNT], "retired count disagrees with slot states")
        require(len(live) + len(free) + counts[RETIRED] + counts[WRITING] == cap,
                "free + live + retired + writing != capacity")
        for key, slot in index.items():
            require(st.slot_key[slot] == key, f"slot {slot} records key {st.slot_key[slot]}, index says {key}")
        require(all(pins[s] >= 0 for s in range(cap)), "negative pin count")
        require(all(pins[s] == 0 for s in free), "a free slot is pinned")
        order = st.policy.order()
        require(len(order) == len(live) and set(order) == live, "eviction order disagrees with the index")
        holds = st.holds
        for slot in range(cap):
            holders = holds.holders_of(slot)
            require(holds.count[slot] == len(holders), f"slot {slot}: hold count disagrees with its holders")
            require(not holders or slot in live, f"slot {slot} is held but holds no entry")
            require(all(holds.pid[h] for h in holders), f"slot {slot} is held by a holder that was removed")
        scalars = st.scalars
        require(scalars[INSERTED] - scalars[EVICTED] - scalars[REMOVED] == len(index),
                "inserted - evicted - removed != len")
        if self.count_stats:
            s = st.stats.snapshot()
            require(min(s.hits, s.misses, s.evictions, s.inserts, s.updates) >= 0, "negative counter")
