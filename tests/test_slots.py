"""concurrent_kv.slots: the slot state machine alone, over process-memory metadata (no lock, no tensor)."""

from __future__ import annotations

from typing import Type

import pytest

from concurrent_kv.errors import InvariantError, PoolExhaustedError
from concurrent_kv.eviction import EvictionPolicy, FIFOPolicy, LRUPolicy, PriorityPolicy
from concurrent_kv.slots import SlotTable
from concurrent_kv.state import DIRTY, FREE, READY, RETIRED, WRITING, LocalState
from concurrent_kv.stats import EVICTIONS, INSERTS, UPDATES

POLICIES = [FIFOPolicy, LRUPolicy, PriorityPolicy]


def table(capacity: int = 3, policy: Type[EvictionPolicy] = FIFOPolicy, stats: bool = True) -> SlotTable:
    return SlotTable(LocalState(capacity, policy), "t", stats, pid=1234)


def store(t: SlotTable, key: int, priority: float = 0.0) -> int:
    """What the pool does for a new key: take a slot, mark it, (copy,) publish."""
    with t.changing:
        slot = t.take()
        t.writing(slot, key)
        t.publish(key, slot, priority)
    return slot


@pytest.mark.parametrize("policy", POLICIES)
def test_take_uses_free_slots_from_slot_zero_then_evicts_the_policy_victim(policy: Type[EvictionPolicy]) -> None:
    t = table(3, policy)
    assert [store(t, k, priority=float(k)) for k in (10, 11, 12)] == [0, 1, 2]
    victim = t.take()  # full: the first victim of every policy here is key 10 (oldest, lowest)
    assert victim == 0
    assert t.state.index.get(10) is None and t.state.slot_state[0] == FREE
    assert t.state.stats.counters[EVICTIONS] == 1
    t.give_back(victim)
    t.audit()


def test_take_skips_pinned_slots_and_the_kept_one() -> None:
    t = table(3)
    for k in (10, 11, 12):
        store(t, k)
    t.state.pins.own[0] += 1  # key 10 leased
    assert t.take(keep=1) == 2  # 10 pinned, 11 kept: 12 goes
    t.give_back(2)
    t.state.pins.own[0] -= 1
    t.audit()


def test_take_raises_when_every_slot_is_pinned_and_changes_nothing() -> None:
    t = table(2)
    for k in (1, 2):
        store(t, k)
        t.state.pins.own[t.state.index.get(k)] += 1
    with pytest.raises(PoolExhaustedError, match="pinned"):
        t.take()
    assert sorted(t.state.index) == [1, 2]
    assert t.state.stats.counters[EVICTIONS] == 0


def test_publish_counts_an_insert_then_an_update_and_frees_the_older_slot() -> None:
    t = table(3)
    first = store(t, 7)
    second = store(t, 7)  # the same key published again from another slot
    assert first != second
    assert t.state.index.get(7) == second
    assert t.state.slot_state[first] == FREE and first in list(t.state.free)
    assert t.state.stats.counters[INSERTS] == 1 and t.state.stats.counters[UPDATES] == 1
    t.audit()


def test_drop_retires_a_pinned_slot_and_the_sweep_frees_it_once_unpinned() -> None:
    t = table(2)
    slot = store(t, 5)
    t.state.pins.own[slot] += 1
    t.drop(5, slot)
    assert t.state.slot_state[slot] == RETIRED
    assert t.occupancy().retired == 1
    t.sweep()
    assert t.state.slot_state[slot] == RETIRED  # still pinned: kept
    t.state.pins.own[slot] -= 1
    t.sweep()
    assert t.state.slot_state[slot] == FREE and t.occupancy().retired == 0
    t.audit()


def test_take_sweeps_retired_slots_when_nothing_is_free() -> None:
    t = table(1)
    slot = store(t, 5)
    t.state.pins.own[slot] += 1
    t.drop(5, slot)
    t.state.pins.own[slot] -= 1
    assert t.take() == slot  # no free slot, one retired and unpinned: reclaimed


def test_reserve_pins_a_writing_slot_until_unreserve_and_release() -> None:
    t = table(2)
    slot = t.reserve()
    assert t.state.slot_state[slot] == WRITING and t.state.pins.total(slot) == 1
    assert t.any_writing()
    t.audit()  # a pinned WRITING slot is a split write in flight: allowed
    t.unreserve(slot)
    with pytest.raises(InvariantError, match="no writer"):
        t.audit()
    t.give_back(slot)
    assert not t.any_writing()
    t.audit()


def test_republish_keeps_the_slot_and_counts_an_update() -> None:
    t = table(2, LRUPolicy)
    a, b = store(t, 1), store(t, 2)
    t.writing(a, 1)
    t.republish(a, 0.0)
    assert t.state.slot_state[a] == READY
    assert t.state.policy.order() == [b, a]  # LRU: the rewritten entry is most recent
    assert t.state.stats.counters[UPDATES] == 1


def test_changing_marks_dirty_inside_and_clears_on_exit_and_on_error() -> None:
    t = table(2)
    with t.changing:
        assert t.state.scalars[DIRTY] == 1234 and t.dirty
    assert not t.dirty
    with pytest.raises(KeyError):
        with t.changing:
            t.drop(99, 0)  # no such key
    assert not t.dirty


@pytest.mark.parametrize("policy", POLICIES)
def test_rebuild_after_a_crash_mid_write_serves_no_half_written_entry(policy: Type[EvictionPolicy]) -> None:
    t = table(4, policy)
    for k in (1, 2, 3):
        store(t, k, priority=float(k))
    # A process dies after marking key 2's slot WRITING for an in-place rewrite, and after
    # taking a free slot for key 9 (WRITING, unpinned), with the index and policy torn.
    slot2 = t.state.index.get(2)
    t.state.scalars[DIRTY] = 1
    t.writing(slot2, 2)
    spare = t.state.free.pop()
    t.writing(spare, 9)
    t.rebuild()
    assert sorted(t.state.index) == [1, 3]
    assert t.state.slot_state[slot2] == FREE and t.state.slot_state[spare] == FREE
    assert not t.dirty
    t.audit()
    assert [t.state.slot_key[s] for s in t.state.policy.order()] == [1, 3]


def test_rebuild_keeps_one_slot_of_a_key_published_twice() -> None:
    t = table(3)
    a = store(t, 4)
    b = t.take()
    t.state.slot_key[b] = 4  # a crash between retiring the old slot and publishing the new
    t.state.slot_state[b] = READY
    t.rebuild()
    assert t.state.index.get(4) in (a, b) and len(t.state.index) == 1
    t.audit()


def test_drop_all_empties_the_index_and_keeps_totals_balanced() -> None:
    t = table(3)
    for k in (1, 2, 3):
        store(t, k)
    t.drop_all()
    occ = t.occupancy()
    assert (occ.live, occ.free, occ.retired) == (0, 3, 0)
    t.audit()


def test_audit_names_each_broken_invariant() -> None:
    t = table(3)
    slot = store(t, 1)
    t.state.slot_state[slot] = FREE
    with pytest.raises(InvariantError, match="not READY"):
        t.audit()
    t.state.slot_state[slot] = READY
    t.state.pins.own[slot] = -1
    with pytest.raises(InvariantError, match="negative pin"):
        t.audit()


def test_disabled_stats_count_nothing() -> None:
    t = table(1, stats=False)
    store(t, 1)
    store(t, 2)  # evicts 1
    assert list(t.state.stats.counters) == [0, 0, 0, 0, 0]


def holder(t: SlotTable) -> int:
    return t.state.holds.claim(1234, 0)


def test_a_held_slot_is_skipped_by_eviction_like_a_leased_one() -> None:
    t = table(2)
    a, b = store(t, 1), store(t, 2)
    h = holder(t)
    t.hold(a, h)
    assert t.take() == b  # key 1 is the FIFO victim but held: key 2 goes
    t.give_back(b)
    t.hold(a, h)  # holding twice is holding once
    assert t.state.holds.count[a] == 1
    assert store(t, 3) == b
    t.state.pins.own[b] += 1  # key 1 held, key 3 leased: nothing can go
    with pytest.raises(PoolExhaustedError):
        t.take()


def test_let_go_removes_only_entries_no_one_else_holds() -> None:
    t = table(3)
    a, b = store(t, 1), store(t, 2)
    h1, h2 = holder(t), holder(t)
    t.hold(a, h1), t.hold(b, h1), t.hold(b, h2)
    assert t.let_go(h1) == 1
    assert t.state.index.get(1) is None and t.state.index.get(2) == b
    assert t.state.holds.count[b] == 1
    t.audit()


def test_publish_gives_the_old_slots_holders_to_the_new_slot_and_drop_clears_holds() -> None:
    t = table(3)
    old = store(t, 1)
    h = holder(t)
    t.hold(old, h)
    t.state.pins.own[old] += 1  # leased: the rewrite goes to another slot
    new = store(t, 1)
    assert t.state.holds.holders_of(new) == [h] and t.state.holds.count[old] == 0
    t.state.pins.own[old] -= 1
    t.drop(1, new)
    assert t.state.holds.count[new] == 0 and t.state.holds.holders_of(new) == []
    t.sweep()
    t.audit()


def test_rebuild_recounts_holds_and_drops_those_on_freed_slots() -> None:
    t = table(3)
    a, b = store(t, 1), store(t, 2)
    h = holder(t)
    t.hold(a, h), t.hold(b, h)
    t.state.holds.count[a] = 7  # torn by a crash
    t.writing(b, 2)  # a crash mid-rewrite of key 2
    t.rebuild()
    assert t.state.holds.count[a] == 1 and t.state.holds.count[b] == 0
    assert t.state.holds.holders_of(b) == []
    t.audit()


def test_audit_catches_a_hold_count_out_of_step() -> None:
    t = table(2)
    a = store(t, 1)
    t.hold(a, holder(t))
    t.state.holds.count[a] = 2
    with pytest.raises(InvariantError, match="hold count"):
        t.audit()
