"""concurrent_kv/eviction.py: unit and property tests of the pure eviction policies.

The policies are driven directly (insert / remove / touch / update / victim / order / clear with
an ``is_pinned`` callable) and compared with tiny reference models written here.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concurrent_kv import (
    ConfigError,
    InvalidPriorityError,
    KeysValues,
    KVCachePool,
    PoolExhaustedError,
)
from concurrent_kv import eviction as ev
from concurrent_kv.eviction import (
    EvictionPolicy,
    EvictionStrategy,
    FIFOPolicy,
    LRUPolicy,
    PriorityPolicy,
    check_priority,
    register_policy,
    resolve_policy,
)

POLICIES = [FIFOPolicy, LRUPolicy, PriorityPolicy]


def nothing_pinned(slot: int) -> bool:
    return False


def pinned_set(slots) -> Callable[[int], bool]:
    frozen = frozenset(slots)
    return frozen.__contains__


def everything_pinned(slot: int) -> bool:
    return True


# ---------------------------------------------------------------------------------------------
# victim(): empty, all pinned, skipping pinned slots
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", POLICIES)
def test_victim_is_none_when_empty(cls):
    policy = cls(4)
    assert policy.victim(nothing_pinned) is None
    assert policy.victim(everything_pinned) is None
    assert policy.order() == []


@pytest.mark.parametrize("cls", POLICIES)
def test_victim_is_none_when_every_slot_is_pinned(cls):
    policy = cls(4)
    for slot in (2, 0, 3, 1):
        policy.insert(slot, 0.0)
    assert policy.victim(everything_pinned) is None
    assert policy.victim(pinned_set({0, 1, 2, 3})) is None
    # Nothing was changed by asking.
    assert policy.order() == [2, 0, 3, 1]
    assert policy.victim(nothing_pinned) == 2


@pytest.mark.parametrize("cls", POLICIES)
def test_victim_skips_pinned_slots(cls):
    policy = cls(6)
    for slot in (5, 3, 1, 0, 4):
        policy.insert(slot, 1.0)  # equal priorities: every policy orders by insertion
    assert policy.order() == [5, 3, 1, 0, 4]
    assert policy.victim(nothing_pinned) == 5
    assert policy.victim(pinned_set({5})) == 3
    assert policy.victim(pinned_set({5, 3})) == 1
    assert policy.victim(pinned_set({5, 3, 1, 0})) == 4
    assert policy.victim(pinned_set({3, 1})) == 5  # pins after the head do not matter
    assert policy.victim(pinned_set({5, 3, 1, 0, 4})) is None


def test_priority_victim_skips_pinned_slots_by_priority():
    policy = PriorityPolicy(8)
    prios = {0: 5.0, 1: 1.0, 2: 3.0, 3: 0.5, 4: 4.0, 5: 2.0, 6: 6.0, 7: -1.0}
    for slot, prio in prios.items():
        policy.insert(slot, prio)
    ranked = sorted(prios, key=prios.__getitem__)
    assert policy.order() == ranked
    for k in range(len(ranked)):
        assert policy.victim(pinned_set(ranked[:k])) == ranked[k]
    # Pin every other slot of the ranking: the first unpinned one in rank order wins.
    pins = set(ranked[::2])
    assert policy.victim(pinned_set(pins)) == ranked[1]


# ---------------------------------------------------------------------------------------------
# FIFO / LRU semantics
# ---------------------------------------------------------------------------------------------


def test_fifo_reads_and_rewrites_keep_the_order():
    policy = FIFOPolicy(4)
    for slot in (1, 3, 0, 2):
        policy.insert(slot, 0.0)
    policy.touch(1)
    policy.update(1, 99.0)
    policy.touch(0)
    policy.update(3, -5.0)
    assert policy.order() == [1, 3, 0, 2]
    assert policy.victim(nothing_pinned) == 1
    assert not policy.reads_mutate


def test_lru_touch_and_update_make_most_recent():
    policy = LRUPolicy(4)
    for slot in (1, 3, 0, 2):
        policy.insert(slot, 0.0)
    policy.touch(1)
    assert policy.order() == [3, 0, 2, 1]
    policy.update(0, 7.0)
    assert policy.order() == [3, 2, 1, 0]
    policy.touch(0)  # already most recent: no change
    assert policy.order() == [3, 2, 1, 0]
    assert policy.victim(nothing_pinned) == 3
    assert policy.reads_mutate


def test_priority_reads_change_nothing():
    policy = PriorityPolicy(3)
    policy.insert(0, 1.0)
    policy.insert(1, 2.0)
    policy.touch(0)
    assert policy.order() == [0, 1]
    assert not policy.reads_mutate


@pytest.mark.parametrize("cls", [FIFOPolicy, LRUPolicy])
def test_list_remove_head_middle_tail(cls):
    policy = cls(5)
    for slot in range(5):
        policy.insert(slot, 0.0)
    policy.remove(2)  # middle
    assert policy.order() == [0, 1, 3, 4]
    policy.remove(0)  # head
    assert policy.order() == [1, 3, 4]
    policy.remove(4)  # tail
    assert policy.order() == [1, 3]
    policy.insert(4, 0.0)
    policy.insert(0, 0.0)
    assert policy.order() == [1, 3, 4, 0]
    policy.remove(1)
    policy.remove(3)
    policy.remove(4)
    policy.remove(0)
    assert policy.order() == []
    assert policy.victim(nothing_pinned) is None


# ---------------------------------------------------------------------------------------------
# PRIORITY semantics
# ---------------------------------------------------------------------------------------------


def test_priority_lowest_first():
    policy = PriorityPolicy(5)
    for slot, prio in [(0, 3.0), (1, -2.0), (2, 10.0), (3, 0.0), (4, 1.5)]:
        policy.insert(slot, prio)
    assert policy.order() == [1, 3, 4, 0, 2]
    assert policy.victim(nothing_pinned) == 1


def test_priority_ties_broken_by_insertion_order():
    policy = PriorityPolicy(6)
    for slot in (4, 2, 5, 0, 3, 1):
        policy.insert(slot, 1.0)
    assert policy.order() == [4, 2, 5, 0, 3, 1]
    assert policy.victim(nothing_pinned) == 4
    policy.remove(4)
    assert policy.victim(nothing_pinned) == 2
    # A re-inserted slot is a fresh (newest) insertion.
    policy.insert(4, 1.0)
    assert policy.order() == [2, 5, 0, 3, 1, 4]


def test_priority_ties_between_int_and_float_priorities():
    policy = PriorityPolicy(3)
    policy.insert(2, 1)
    policy.insert(0, 1.0)
    policy.insert(1, np.float64(1.0))
    assert policy.order() == [2, 0, 1]


def test_priority_update_resorts():
    policy = PriorityPolicy(4)
    for slot, prio in [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]:
        policy.insert(slot, prio)
    policy.update(0, 10.0)  # the root sinks
    assert policy.order() == [1, 2, 3, 0]
    assert policy.victim(nothing_pinned) == 1
    policy.update(3, -1.0)  # a leaf rises to the root
    assert policy.order() == [3, 1, 2, 0]
    assert policy.victim(nothing_pinned) == 3
    policy.update(2, 2.5)  # small move in the middle
    assert policy.order() == [3, 1, 2, 0]


def test_priority_update_keeps_insertion_seq_for_ties():
    policy = PriorityPolicy(3)
    policy.insert(0, 5.0)  # oldest
    policy.insert(1, 1.0)
    policy.insert(2, 1.0)
    # Rewriting slot 0 to priority 1.0: it keeps its (oldest) insertion number, so it now goes first.
    policy.update(0, 1.0)
    assert policy.order() == [0, 1, 2]
    assert policy.victim(nothing_pinned) == 0
    # Rewriting slot 2 (newest) to the same priority keeps it last among the ties.
    policy.update(2, 1.0)
    assert policy.order() == [0, 1, 2]


def _check_heap(policy: PriorityPolicy) -> None:
    """The indexed heap's own invariants: positions agree and every parent <= child."""
    n = policy._size
    for i in range(n):
        slot = policy._heap[i]
        assert policy._pos[slot] == i
        if i:
            parent = policy._heap[(i - 1) >> 1]
            key_p = (policy._prio[parent], policy._seq[parent])
            key_c = (policy._prio[slot], policy._seq[slot])
            assert key_p < key_c, f"heap order broken at position {i}"
    present = {policy._heap[i] for i in range(n)}
    for slot in range(policy.capacity):
        if slot not in present:
            assert policy._pos[slot] == -1


# ---------------------------------------------------------------------------------------------
# Random operations against a reference model (all three policies)
# ---------------------------------------------------------------------------------------------


class RefPolicy:
    """A dumb sorted-list model of a policy's order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: Dict[int, Tuple[float, int]] = {}  # slot -> (priority, seq)
        self.clock = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def insert(self, slot: int, prio: float) -> None:
        self.entries[slot] = (float(prio), self._tick())

    def remove(self, slot: int) -> None:
        del self.entries[slot]

    def touch(self, slot: int) -> None:
        if self.name == "lru":
            self.entries[slot] = (self.entries[slot][0], self._tick())

    def update(self, slot: int, prio: float) -> None:
        old_prio, seq = self.entries[slot]
        if self.name == "lru":
            self.entries[slot] = (old_prio, self._tick())
        elif self.name == "priority":
            self.entries[slot] = (float(prio), seq)

    def order(self) -> List[int]:
        if self.name == "priority":
            return sorted(self.entries, key=lambda s: self.entries[s])
        return sorted(self.entries, key=lambda s: self.entries[s][1])

    def victim(self, is_pinned) -> Optional[int]:
        for slot in self.order():
            if not is_pinned(slot):
                return slot
        return None

    def clear(self) -> None:
        self.entries.clear()


PRIORITIES = st.sampled_from([-2.0, -1, 0, 0.0, 0.5, 1, 1.0, 2.5, 3, 1e9, -1e-9])


@st.composite
def policy_programs(draw):
    capacity = draw(st.integers(1, 12))
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["insert", "insert", "insert", "remove", "touch", "update", "victim", "clear"]),
                st.integers(0, 10**6),
                PRIORITIES,
                st.sets(st.integers(0, capacity - 1)),
            ),
            max_size=60,
        )
    )
    return capacity, ops


@pytest.mark.parametrize("cls", POLICIES)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=policy_programs())
def test_random_operations_match_reference(cls, program):
    capacity, ops = program
    policy = cls(capacity)
    ref = RefPolicy(cls.name)
    for op, pick, prio, pins in ops:
        present = sorted(ref.entries)
        absent = [s for s in range(capacity) if s not in ref.entries]
        if op == "insert" and absent:
            slot = absent[pick % len(absent)]
            policy.insert(slot, prio)
            ref.insert(slot, prio)
        elif op in ("remove", "touch", "update") and present:
            slot = present[pick % len(present)]
            if op == "update":
                policy.update(slot, prio)
                ref.update(slot, prio)
            else:
                getattr(policy, op)(slot)
                getattr(ref, op)(slot)
        elif op == "victim":
            is_pinned = pinned_set(pins)
            assert policy.victim(is_pinned) == ref.victim(is_pinned)
        elif op == "clear":
            policy.clear()
            ref.clear()
        assert policy.order() == ref.order()
        assert policy.victim(nothing_pinned) == ref.victim(nothing_pinned)
        if isinstance(policy, PriorityPolicy):
            _check_heap(policy)


def test_priority_remove_from_middle_keeps_heap_valid():
    """Deterministic random churn with many removals from inside the heap."""
    rng = random.Random(1234)
    capacity = 64
    policy = PriorityPolicy(capacity)
    ref = RefPolicy("priority")
    for _ in range(3000):
        present = list(ref.entries)
        absent = [s for s in range(capacity) if s not in ref.entries]
        r = rng.random()
        if absent and (r < 0.5 or not present):
            slot = rng.choice(absent)
            prio = rng.choice([rng.randint(-3, 3), rng.uniform(-3, 3)])
            policy.insert(slot, prio)
            ref.insert(slot, prio)
        elif r < 0.8:
            # remove a slot that is neither the root nor the last heap position when possible
            inner = [policy._heap[i] for i in range(1, policy._size - 1)]
            slot = rng.choice(inner or present)
            policy.remove(slot)
            ref.remove(slot)
        else:
            slot = rng.choice(present)
            prio = rng.uniform(-4, 4)
            policy.update(slot, prio)
            ref.update(slot, prio)
        _check_heap(policy)
        assert policy.order() == ref.order()
        pins = set(rng.sample(sorted(ref.entries), k=len(ref.entries) // 2)) if ref.entries else set()
        assert policy.victim(pinned_set(pins)) == ref.victim(pinned_set(pins))


@pytest.mark.parametrize("cls", POLICIES)
def test_clear_forgets_everything_and_policy_is_reusable(cls):
    policy = cls(4)
    for slot in range(4):
        policy.insert(slot, float(slot))
    policy.clear()
    assert policy.order() == []
    assert policy.victim(nothing_pinned) is None
    for slot in (3, 1):
        policy.insert(slot, 0.0)
    assert policy.order() == [3, 1]
    policy.remove(3)
    assert policy.order() == [1]
    assert policy.victim(nothing_pinned) == 1


# ---------------------------------------------------------------------------------------------
# victim() with many pinned slots does not degrade
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", POLICIES)
@pytest.mark.parametrize("equal_priorities", [True, False])
def test_victim_with_999_of_1000_slots_pinned(cls, equal_priorities):
    n = 1000
    policy = cls(n)
    free_slot = 617
    order = [s for s in range(n) if s != free_slot] + [free_slot]  # the unpinned one is last/worst
    for rank, slot in enumerate(order):
        policy.insert(slot, 0.0 if equal_priorities else float(rank))
    calls = [0]

    def is_pinned(slot: int) -> bool:
        calls[0] += 1
        return slot != free_slot

    start = time.perf_counter()
    for _ in range(20):
        assert policy.victim(is_pinned) == free_slot
    elapsed = time.perf_counter() - start
    # Each call asks about every slot at most once (the heap root may be asked twice).
    assert calls[0] <= 20 * (n + 1)
    assert elapsed < 2.0, f"20 victim() calls with 999 pinned slots took {elapsed:.3f}s"
    calls[0] = 0
    # All 1000 pinned: None, again with at most one question per slot.
    assert policy.victim(lambda s: (calls.__setitem__(0, calls[0] + 1), True)[1]) is None
    assert calls[0] <= n + 1


def test_priority_victim_with_many_pinned_is_heap_walk_not_full_scan():
    """With the p lowest slots pinned, PRIORITY asks about O(p) slots, not all n."""
    n = 4096
    policy = PriorityPolicy(n)
    for slot in range(n):
        policy.insert(slot, float(slot))
    pinned = set(range(10))
    asked: List[int] = []

    def is_pinned(slot: int) -> bool:
        asked.append(slot)
        return slot in pinned

    assert policy.victim(is_pinned) == 10
    assert len(asked) <= 3 * (len(pinned) + 1)


# ---------------------------------------------------------------------------------------------
# resolve_policy / register_policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy, expected",
    [
        (EvictionStrategy.FIFO, FIFOPolicy),
        (EvictionStrategy.LRU, LRUPolicy),
        (EvictionStrategy.PRIORITY, PriorityPolicy),
        ("fifo", FIFOPolicy),
        ("FIFO", FIFOPolicy),
        ("Fifo", FIFOPolicy),
        ("lru", LRUPolicy),
        ("LRU", LRUPolicy),
        ("lRu", LRUPolicy),
        ("priority", PriorityPolicy),
        ("PRIORITY", PriorityPolicy),
        ("Priority", PriorityPolicy),
        (FIFOPolicy, FIFOPolicy),
        (LRUPolicy, LRUPolicy),
        (PriorityPolicy, PriorityPolicy),
    ],
)
def test_resolve_policy_accepts_enum_name_and_class(strategy, expected):
    assert resolve_policy(strategy) is expected


def test_resolve_policy_accepts_an_unregistered_subclass():
    class Unregistered(FIFOPolicy):
        name = "never-registered"

    assert resolve_policy(Unregistered) is Unregistered
    with pytest.raises(ConfigError):
        resolve_policy("never-registered")


@pytest.mark.parametrize("bad", ["lfu", "", " fifo", "fifo ", "random", "FIFOPolicy", 3, None, 1.5, int, object, b"fifo"])
def test_resolve_policy_rejects_unknown(bad):
    with pytest.raises(ConfigError) as info:
        resolve_policy(bad)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["lfu", "LIFO", 7])
def test_pool_rejects_unknown_strategy(bad):
    with pytest.raises(ConfigError):
        KVCachePool(3, eviction_strategy=bad)


class NewestFirstPolicy(EvictionPolicy):
    """LIFO: evict the newest insertion first (a tiny custom policy, test-only)."""

    name = "lifo-test"

    def __init__(self, capacity, arrays=ev.list_arrays):
        super().__init__(capacity, arrays)
        self._stack: List[int] = []

    def insert(self, slot, priority):
        self._stack.append(slot)

    def remove(self, slot):
        self._stack.remove(slot)

    def victim(self, is_pinned):
        for slot in reversed(self._stack):
            if not is_pinned(slot):
                return slot
        return None

    def order(self):
        return list(reversed(self._stack))

    def clear(self):
        self._stack.clear()


@pytest.fixture
def registry_snapshot():
    """Restore the global policy registry after a test registers policies."""
    saved = dict(ev._POLICIES)
    yield
    ev._POLICIES.clear()
    ev._POLICIES.update(saved)


def tiny_entry(key: int) -> KeysValues:
    """A 1-layer entry whose data and token counts encode ``key``."""
    kv = KeysValues(1, 1, 2, 2, 1)
    block = kv._block
    block.copy_(torch.arange(block.numel(), dtype=block.dtype).reshape(block.shape) + 100.0 * key)
    kv[0]._k_cache._size = key % 3
    kv[0]._v_cache._size = (key + 1) % 3
    return kv


def value_of(kv) -> float:
    return float(kv._block.reshape(-1)[0].item()) / 100.0


def test_register_policy_makes_a_custom_policy_usable_end_to_end(registry_snapshot):
    assert register_policy(NewestFirstPolicy) is NewestFirstPolicy
    assert resolve_policy("lifo-test") is NewestFirstPolicy
    assert resolve_policy("LIFO-TEST") is NewestFirstPolicy
    assert not NewestFirstPolicy(2).reads_mutate

    pool = KVCachePool(3, eviction_strategy="lifo-test", name="lifo")
    assert "lifo-test" in repr(pool)
    for key in (10, 11, 12):
        pool.set(key, tiny_entry(key))
    pool.check()
    pool.set(13, tiny_entry(13))  # full: the newest (12) goes
    assert sorted(pool.keys()) == [10, 11, 13]
    pool.set(14, tiny_entry(14))  # now 13 is the newest
    assert sorted(pool.keys()) == [10, 11, 14]
    with pool.lease(14) as view:
        assert view is not None and value_of(view) == 14
        pool.set(15, tiny_entry(15))  # 14 is pinned: the newest unpinned (11) goes
        assert sorted(pool.keys()) == [10, 14, 15]
        pool.check()
    got = pool.get(10)
    assert got is not None and value_of(got) == 10
    assert got[0]._k_cache._size == 10 % 3 and got[0]._v_cache._size == 11 % 3
    assert pool.get(12) is None
    snap = pool.stats_snapshot()
    assert (snap.inserts, snap.evictions, snap.hits, snap.misses, snap.updates) == (6, 3, 2, 1, 0)
    pool.check()
    # Leasing everything exhausts the custom policy too.
    leases = [pool.lease(k) for k in pool.keys()]
    for lease in leases:
        lease.__enter__()
    with pytest.raises(PoolExhaustedError):
        pool.set(99, tiny_entry(99))
    for lease in leases:
        lease.__exit__(None, None, None)
    pool.check()
    pool.close()


def test_register_policy_with_a_mixed_case_name_is_selectable_by_that_name(registry_snapshot):
    """register_policy's contract: "make ``cls`` selectable by its ``name``"."""

    class MixedCase(NewestFirstPolicy):
        name = "Newest-First-Test"

    register_policy(MixedCase)
    assert resolve_policy("Newest-First-Test") is MixedCase
    assert resolve_policy("newest-first-test") is MixedCase


# ---------------------------------------------------------------------------------------------
# check_priority
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good, expected",
    [
        (0, 0.0),
        (-3, -3.0),
        (2.5, 2.5),
        (-0.0, 0.0),
        (1e308, 1e308),
        (np.int64(7), 7.0),
        (np.int8(-2), -2.0),
        (np.float32(0.5), 0.5),
        (np.float64(-1.25), -1.25),
        (2**62, float(2**62)),
    ],
)
def test_check_priority_accepts_finite_reals(good, expected):
    value = check_priority(good)
    assert type(value) is float
    assert value == expected


@pytest.mark.parametrize(
    "bad",
    [
        math.nan,
        math.inf,
        -math.inf,
        float("nan"),
        np.float32("nan"),
        np.float64("inf"),
        np.float32("-inf"),
        "1",
        "nan",
        "",
        True,
        False,
        np.bool_(True),
        None,
        1j,
        [1.0],
        (1.0,),
        object(),
    ],
    # A stable id per case: repr(object()) holds an address, which differs between xdist workers.
    ids=lambda v: type(v).__name__ if type(v) is object else repr(v),
)
def test_check_priority_rejects_non_finite_and_non_real(bad):
    with pytest.raises(InvalidPriorityError) as info:
        check_priority(bad)
    assert isinstance(info.value, ValueError)


def test_check_priority_rejects_an_int_too_large_for_a_float():
    """A huge int is not a finite float: the documented error is InvalidPriorityError."""
    with pytest.raises(InvalidPriorityError):
        check_priority(10**400)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1", True, np.bool_(False)], ids=repr)
def test_pool_set_with_bad_priority_changes_nothing(bad):
    pool = KVCachePool(2, eviction_strategy="priority")
    pool.set(1, tiny_entry(1), priority=1.0)
    before = pool.stats_snapshot()
    with pytest.raises(InvalidPriorityError):
        pool.set(2, tiny_entry(2), priority=bad)
    with pytest.raises(InvalidPriorityError):
        pool.set(1, tiny_entry(3), priority=bad)
    assert pool.keys() == [1]
    assert pool.stats_snapshot() == before
    got = pool.get(1)
    assert got is not None and value_of(got) == 1
    pool.check()
