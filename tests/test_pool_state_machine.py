"""concurrent_kv/pool.py: stateful tests, a real ``KVCachePool`` against a sequential model per policy.

The model (written here, from the documented semantics and ``pool.py`` / ``eviction.py``):

* a dict key -> entry (value tag, priority, seq); the eviction order is the live keys sorted by
  ``(priority, seq)`` for PRIORITY and by ``seq`` for FIFO / LRU;
* FIFO: a rewrite keeps ``seq``; LRU: a hit (get or lease) and a rewrite take a fresh ``seq``;
  PRIORITY: a rewrite takes the new priority and keeps ``seq``, reads change nothing;
* leases pin one *version* of an entry: a pinned version is never evicted nor overwritten;
  rewriting a leased key is a fresh insertion in another slot (counted as an update) and retires
  the old slot; deleting / clearing a leased key retires its slot too; a retired slot occupies
  capacity until its last lease ends, and is reusable from then on;
* a new slot comes from the free slots, else from evicting the first unpinned key in order, else
  ``PoolExhaustedError`` with nothing changed.

Invariants after every step: ``pool.check()``, len / keys / membership, counters, occupancy,
eviction order, stored data of every entry and of every live lease view. At teardown every lease
is released, the pool is filled (no eviction allowed) and then fed new keys, each of which must
evict the model's victim (a black-box look at the order).

Machines: FIFO, LRU, PRIORITY (the three asked for), plus FIFO / LRU with ``enable_stats=False``
and the three policies over ``shared=True`` pools (same API, metadata in shared memory). The last
section shows the checker has teeth: deliberately broken pools and policies must make it fail.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from concurrent_kv import EntrySpec, InvariantError, KeysValues, KVCachePool, PoolExhaustedError
from concurrent_kv.eviction import FIFOPolicy, PriorityPolicy
from concurrent_kv.slots import SlotTable
from concurrent_kv.storage import SlotStorage

KEYS = st.integers(0, 7)
PRIORITIES = st.sampled_from([None, 0, 0.0, 1, 1.0, 2.5, -1, -0.5, np.float32(2.5), np.int64(1)])

MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------------------------------------
# Entries that encode (key, version)
# ---------------------------------------------------------------------------------------------

_NUMEL = 8  # KeysValues(1, 1, 2, 2, 1): block (2, 1, 1, 2, 2)
SPEC = EntrySpec(num_layers=1, num_samples=1, num_heads=1, max_tokens=2, head_dim=2)


def tag_for(key: int, version: int) -> int:
    return key * 10_000 + version


def expected_block(tag: int) -> torch.Tensor:
    return (torch.arange(_NUMEL, dtype=torch.float32) + float(tag * _NUMEL)).reshape(2, 1, 1, 2, 2)


def expected_sizes(key: int, tag: int) -> Tuple[int, int]:
    return key % 3, (key + tag) % 3


def make_entry(key: int, tag: int) -> KeysValues:
    kv = KeysValues(1, 1, 2, 2, 1)
    kv._block.copy_(expected_block(tag))
    kv[0]._k_cache._size, kv[0]._v_cache._size = expected_sizes(key, tag)
    return kv


def assert_entry(kv, key: int, tag: int, what: str) -> None:
    assert kv is not None, f"{what}: expected the entry of key {key}, got None"
    block = torch.stack([kv[0]._k_cache._cache, kv[0]._v_cache._cache])
    assert torch.equal(block, expected_block(tag)), f"{what}: key {key} holds wrong data (expected tag {tag})"
    sizes = (kv[0]._k_cache._size, kv[0]._v_cache._size)
    assert sizes == expected_sizes(key, tag), f"{what}: key {key} has sizes {sizes}, expected {expected_sizes(key, tag)}"


# White-box access, in one place: eviction order, slot of a key and slot contents, all read
# without touching counters or recency (a get() would count a hit and, for LRU, reorder).


def order_keys(pool: KVCachePool) -> List[int]:
    """The pool's eviction order as keys, first victim first."""
    return [pool._state.slot_key[s] for s in pool._state.policy.order()]


def slot_of(pool: KVCachePool, key: int) -> int:
    slot = pool._index.get(key)
    assert slot is not None, f"key {key} is not indexed"
    return slot


def stored_view(pool: KVCachePool, slot: int) -> KeysValues:
    return pool._storage.view(slot)


def stored_entry_state(pool: KVCachePool, slot: int):
    kv = stored_view(pool, slot)
    return kv._block.flatten().tolist(), (kv[0]._k_cache._size, kv[0]._v_cache._size)


# ---------------------------------------------------------------------------------------------
# The sequential model
# ---------------------------------------------------------------------------------------------


@dataclass
class MEntry:
    eid: int  # one stored version (one slot occupancy)
    tag: int
    prio: float
    seq: int


class Model:
    def __init__(self, strategy: str, capacity: int) -> None:
        self.strategy = strategy
        self.capacity = capacity
        self.live: Dict[int, MEntry] = {}
        self.pins: Dict[int, int] = defaultdict(int)  # eid -> lease count
        self.retired: Set[int] = set()  # eids dropped while pinned
        self.clock = 0
        self.next_eid = 0
        self.stats = dict(hits=0, misses=0, evictions=0, inserts=0, updates=0)

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _new_entry(self, tag: int, prio: float) -> MEntry:
        self.next_eid += 1
        return MEntry(self.next_eid, tag, prio, self._tick())

    def order(self) -> List[int]:
        if self.strategy == "priority":
            return sorted(self.live, key=lambda k: (self.live[k].prio, self.live[k].seq))
        return sorted(self.live, key=lambda k: self.live[k].seq)

    def free(self) -> int:
        return self.capacity - len(self.live) - len(self.retired)

    def victim(self) -> Optional[int]:
        for key in self.order():
            if self.pins[self.live[key].eid] == 0:
                return key
        return None

    def pinned(self, key: int) -> bool:
        return key in self.live and self.pins[self.live[key].eid] > 0

    def would_exhaust(self, key: int) -> bool:
        in_place = key in self.live and not self.pinned(key)
        return not in_place and self.free() == 0 and self.victim() is None

    def set(self, key: int, tag: int, priority) -> Optional[int]:
        """Apply a successful set; return the evicted key, if any."""
        prio = 0.0 if priority is None else float(priority)
        old = self.live.get(key)
        if old is not None and self.pins[old.eid] == 0:  # rewrite in place
            old.tag = tag
            if self.strategy == "lru":
                old.seq = self._tick()
            elif self.strategy == "priority":
                old.prio = prio
            self.stats["updates"] += 1
            return None
        evicted = None
        if self.free() == 0:
            evicted = self.victim()
            assert evicted is not None, "model: caller must check would_exhaust first"
            del self.live[evicted]
            self.stats["evictions"] += 1
        if old is not None:  # the old version is leased: retire it, insert afresh
            del self.live[key]
            self.retired.add(old.eid)
            self.stats["updates"] += 1
        else:
            self.stats["inserts"] += 1
        self.live[key] = self._new_entry(tag, prio)
        return evicted

    def read(self, key: int) -> Optional[MEntry]:
        entry = self.live.get(key)
        if entry is None:
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        if self.strategy == "lru":
            entry.seq = self._tick()
        return entry

    def pin(self, eid: int) -> None:
        self.pins[eid] += 1

    def unpin(self, eid: int) -> None:
        self.pins[eid] -= 1
        assert self.pins[eid] >= 0
        if self.pins[eid] == 0:
            self.retired.discard(eid)

    def delete(self, key: int) -> bool:
        entry = self.live.pop(key, None)
        if entry is None:
            return False
        if self.pins[entry.eid]:
            self.retired.add(entry.eid)
        return True

    def clear(self) -> None:
        for key in list(self.live):
            self.delete(key)


@dataclass
class OpenLease:
    lease: object
    view: KeysValues
    key: int
    eid: int
    tag: int


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Base machine; subclasses pick ``STRATEGY`` (and teeth tests override ``make_pool``)."""

    STRATEGY = "fifo"
    #: compare the policy's internal order with the model's after every step (white-box)
    CHECK_ORDER = True
    #: the pool's enable_stats; when False every counter must stay 0
    STATS = True
    #: a shared-memory pool (same API, metadata in a segment)
    SHARED = False

    def __init__(self) -> None:
        super().__init__()
        self.pool: Optional[KVCachePool] = None
        self.model: Optional[Model] = None
        self.leases: List[OpenLease] = []
        self.version = 0

    def make_pool(self, capacity: int) -> KVCachePool:
        return KVCachePool(
            capacity,
            eviction_strategy=self.STRATEGY,
            enable_stats=self.STATS,
            name=f"sm-{self.STRATEGY}",
            shared=self.SHARED,
            entry_spec=SPEC if self.SHARED else None,
        )

    def _tag(self, key: int) -> int:
        self.version += 1
        return tag_for(key, self.version)

    @initialize(capacity=st.sampled_from([1, 2, 3, 4, 5]))
    def init_pool(self, capacity: int) -> None:
        self.pool = self.make_pool(capacity)
        self.model = Model(self.STRATEGY, capacity)

    # -- rules -----------------------------------------------------------------------------

    def _do_set(self, key: int, priority) -> None:
        tag = self._tag(key)
        entry = make_entry(key, tag)
        if self.model.would_exhaust(key):
            before = self._snapshot()
            try:
                self.pool.set(key, entry, priority=priority)
            except PoolExhaustedError:
                pass
            else:
                raise AssertionError(f"set({key}) with every slot leased should raise PoolExhaustedError")
            assert self._snapshot() == before, "a failed set changed the pool"
            return
        evicted = self.model.set(key, tag, priority)
        slot = self.pool.set(key, entry, priority=priority)
        assert isinstance(slot, int) and 0 <= slot < self.model.capacity
        assert slot_of(self.pool, key) == slot
        if evicted is not None:
            assert evicted not in self.pool, f"key {evicted} should have been evicted"
        # The caller's entry was deep-copied: scribbling on it changes nothing stored.
        entry._block.fill_(-1.0)

    @rule(key=KEYS, priority=PRIORITIES)
    def set_entry(self, key: int, priority) -> None:
        self._do_set(key, priority)

    @rule(key=KEYS, use_out=st.booleans())
    def get_entry(self, key: int, use_out: bool) -> None:
        out = None
        if use_out:
            out = KeysValues(1, 1, 2, 2, 1)
            out._block.fill_(-7.0)
        got = self.pool.get(key, out=out)
        expected = self.model.read(key)
        if expected is None:
            assert got is None, f"get({key}) hit, the model says miss"
            return
        if use_out:
            assert got is out
        assert_entry(got, key, expected.tag, f"get({key})")
        # A private copy: writing it does not touch the pool.
        got[0]._k_cache._cache.fill_(-3.0)

    @rule(key=KEYS)
    def delete_entry(self, key: int) -> None:
        assert self.pool.delete(key) == self.model.delete(key)

    @rule()
    def clear_pool(self) -> None:
        self.pool.clear()
        self.model.clear()

    @rule(key=KEYS)
    def lease_enter(self, key: int) -> None:
        self._do_lease(key)

    def _do_lease(self, key: int) -> None:
        lease = self.pool.lease(key)
        view = lease.__enter__()
        expected = self.model.read(key)
        if expected is None:
            assert view is None, f"lease({key}) hit, the model says miss"
            lease.__exit__(None, None, None)  # exiting a missed lease is a no-op
            return
        assert_entry(view, key, expected.tag, f"lease({key})")
        self.model.pin(expected.eid)
        self.leases.append(OpenLease(lease, view, key, expected.eid, expected.tag))

    def _exit(self, index: int) -> None:
        held = self.leases.pop(index)
        assert_entry(held.view, held.key, held.tag, f"leased view of {held.key} before exit")
        held.lease.__exit__(None, None, None)
        self.model.unpin(held.eid)

    @precondition(lambda self: self.model is not None and self.model.live)
    @rule(pick=st.integers(0, 10**6))
    def lease_live_key(self, pick: int) -> None:
        self._do_lease(sorted(self.model.live)[pick % len(self.model.live)])

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 10**6))
    def lease_exit(self, pick: int) -> None:
        self._exit(pick % len(self.leases))

    @precondition(lambda self: self.model is not None and self.model.live)
    @rule(pick=st.integers(0, 10**6), priority=PRIORITIES)
    def lease_then_rewrite(self, pick: int, priority) -> None:
        """Lease a live key, then set it while leased: the new value takes another slot."""
        key = sorted(self.model.live)[pick % len(self.model.live)]
        self._do_lease(key)
        self._do_set(key, priority)

    @precondition(lambda self: self.leases)
    @rule()
    def lease_exit_all(self) -> None:
        while self.leases:
            self._exit(0)

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 10**6), priority=PRIORITIES)
    def rewrite_leased_key(self, pick: int, priority) -> None:
        """Set a key some lease holds (if its leased version is still the live one, the new
        value goes to another slot and the old slot is retired)."""
        self._do_set(self.leases[pick % len(self.leases)].key, priority)

    @rule(key=KEYS, priority=PRIORITIES, release=st.booleans())
    def fill_lease_all_then_set(self, key: int, priority, release: bool) -> None:
        """Fill every free slot, lease every unpinned entry, then a set must raise
        PoolExhaustedError and change nothing."""
        spare = [k for k in range(8) if k not in self.model.live]
        while self.model.free() > 0:
            self._do_set(spare.pop(), 0.0)
        taken = len(self.leases)
        for k in list(self.model.live):
            if not self.model.pinned(k):
                self._do_lease(k)
        assert self.model.would_exhaust(key)
        self._do_set(key, priority)  # asserts PoolExhaustedError and an unchanged pool
        if release:  # let go of the leases taken here, newest first
            while len(self.leases) > taken:
                self._exit(len(self.leases) - 1)

    # -- invariants ------------------------------------------------------------------------

    def _order_keys(self) -> List[int]:
        return order_keys(self.pool)

    def _snapshot(self):
        pool = self.pool
        slots = {k: slot_of(pool, k) for k in pool.keys()}
        return (
            slots,
            {k: stored_entry_state(pool, s) for k, s in slots.items()},
            pool.stats_snapshot(),
            self._order_keys(),
            pool.occupancy(),
        )

    @invariant()
    def pool_matches_model(self) -> None:
        if self.pool is None:
            return
        pool, model = self.pool, self.model
        pool.check()
        assert len(pool) == len(model.live)
        assert set(pool.keys()) == set(model.live)
        for k in range(8):
            assert (k in pool) == (k in model.live)
        snap = pool.stats_snapshot()
        expected = model.stats if self.STATS else dict.fromkeys(model.stats, 0)
        for name, value in expected.items():
            assert getattr(snap, name) == value, f"stats.{name} = {getattr(snap, name)}, model says {value}"
        assert snap.hits + snap.misses == snap.total_queries
        assert pool.stats.total_queries == expected["hits"] + expected["misses"]
        assert pool.stats == snap
        # Slot accounting. A slot removed while leased is retired; once its last lease ends it is
        # reusable (the pool may keep it marked retired until a writer sweeps it up).
        occ = pool.occupancy()
        assert occ.capacity == model.capacity
        assert occ.live == len(model.live)
        assert occ.free + occ.retired == model.capacity - len(model.live)
        assert occ.retired >= len(model.retired), "a retired slot still leased was reused"
        assert occ.pins == sum(model.pins.values()), f"occupancy.pins = {occ.pins}"
        assert occ.pinned == sum(1 for n in model.pins.values() if n), f"occupancy.pinned = {occ.pinned}"
        if self.CHECK_ORDER:
            assert self._order_keys() == model.order(), "eviction order differs from the model"
        # Stored data, read without touching counters or recency.
        for key, entry in model.live.items():
            assert_entry(stored_view(pool, slot_of(pool, key)), key, entry.tag, "stored entry")
        # A leased slot is never overwritten, even after its key was rewritten or deleted.
        for held in self.leases:
            assert_entry(held.view, held.key, held.tag, f"leased view of {held.key}")

    def teardown(self) -> None:
        if self.pool is None:
            return
        try:
            if sys.exc_info()[0] is not None:
                return  # a step already failed: do not mask its error with a second one
            while self.leases:
                self._exit(len(self.leases) - 1)
            self.pool_matches_model()
            occ = self.pool.occupancy()
            assert occ.pins == 0 and occ.pinned == 0
            assert occ.free + occ.retired == self.model.capacity - len(self.model.live)
            # With every lease gone, filling the pool up reuses every non-live slot, evicting nothing.
            evictions = self.pool.stats_snapshot().evictions
            spare = [k for k in range(8) if k not in self.model.live]
            for _ in range(self.model.capacity - len(self.model.live)):
                self._do_set(spare.pop(), 0.0)
            assert self.pool.stats_snapshot().evictions == evictions
            self.pool_matches_model()
            assert self.pool.occupancy().live == self.model.capacity
            # Black-box look at the eviction order: each further new key evicts the model's victim.
            for key in spare:
                self._do_set(key, 0.0)
                self.pool_matches_model()
        finally:
            self.pool.close()


class FIFOMachine(PoolMachine):
    STRATEGY = "fifo"


class LRUMachine(PoolMachine):
    STRATEGY = "lru"


class PriorityMachine(PoolMachine):
    STRATEGY = "priority"


class FIFONoStatsMachine(PoolMachine):
    STRATEGY = "fifo"
    STATS = False


class LRUNoStatsMachine(PoolMachine):
    """LRU reads must still move recency when counters are off."""

    STRATEGY = "lru"
    STATS = False


class SharedFIFOMachine(PoolMachine):
    STRATEGY = "fifo"
    SHARED = True


class SharedLRUMachine(PoolMachine):
    STRATEGY = "lru"
    SHARED = True


class SharedPriorityMachine(PoolMachine):
    STRATEGY = "priority"
    SHARED = True


TestFIFOMachine = FIFOMachine.TestCase
TestFIFOMachine.settings = MACHINE_SETTINGS
TestLRUMachine = LRUMachine.TestCase
TestLRUMachine.settings = MACHINE_SETTINGS
TestPriorityMachine = PriorityMachine.TestCase
TestPriorityMachine.settings = MACHINE_SETTINGS
TestFIFONoStatsMachine = FIFONoStatsMachine.TestCase
TestFIFONoStatsMachine.settings = settings(MACHINE_SETTINGS, max_examples=40)
TestLRUNoStatsMachine = LRUNoStatsMachine.TestCase
TestLRUNoStatsMachine.settings = settings(MACHINE_SETTINGS, max_examples=40)
TestSharedFIFOMachine = SharedFIFOMachine.TestCase
TestSharedFIFOMachine.settings = settings(MACHINE_SETTINGS, max_examples=40)
TestSharedLRUMachine = SharedLRUMachine.TestCase
TestSharedLRUMachine.settings = settings(MACHINE_SETTINGS, max_examples=40)
TestSharedPriorityMachine = SharedPriorityMachine.TestCase
TestSharedPriorityMachine.settings = settings(MACHINE_SETTINGS, max_examples=40)


# ---------------------------------------------------------------------------------------------
# The checker has teeth: deliberately broken pools must be caught
# ---------------------------------------------------------------------------------------------

TEETH_SETTINGS = settings(
    max_examples=1000,  # the search stops at the first failure; these bugs are found in far fewer
    phases=[Phase.generate],  # no shrinking: finding the failure is enough
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


def _make(policy_cls_or_name, capacity: int, pool_cls=KVCachePool) -> KVCachePool:
    return pool_cls(capacity, eviction_strategy=policy_cls_or_name, name="broken")


class FIFORewriteMovesToBack(FIFOPolicy):
    """Broken: a FIFO rewrite moves the key to the back (LRU-like)."""

    name = "broken-fifo"

    def update(self, slot, priority):
        self._list.move_to_back(slot)


class LazyPriority(PriorityPolicy):
    """Broken: a rewrite records the new priority but does not re-sort the heap
    (``order()`` sorts anyway, so only the victims give it away)."""

    name = "lazy-priority"

    def update(self, slot, priority):
        self._prio[slot] = float(priority)


class EvictPinnedFIFO(FIFOPolicy):
    """Broken: ignores pins when choosing a victim."""

    name = "evict-pinned"

    def victim(self, is_pinned):
        return super().victim(lambda slot: False)


class DoubleUnpinPool(KVCachePool):
    """Broken: a lease exit unpins twice."""

    def _unpin(self, slot, *args, **kwargs):
        super()._unpin(slot, *args, **kwargs)
        super()._unpin(slot, *args, **kwargs)


class LeakFreedSlots(SlotTable):
    """Broken: a deleted entry's slot never makes it back to the free list."""

    def drop(self, key, slot, *args, **kwargs):
        super().drop(key, slot, *args, **kwargs)
        if len(self.state.free) and list(self.state.free)[-1] == slot:
            self.state.free.pop()


class LeakFreedSlotPool(KVCachePool):
    _slot_table_cls = LeakFreedSlots


class UncountedEvictions(SlotTable):
    """Broken: evictions are not counted."""

    def take(self, *args, **kwargs):
        before = self.state.stats.evictions
        slot = super().take(*args, **kwargs)
        self.state.stats.evictions = before
        return slot


class UncountedEvictionPool(KVCachePool):
    _slot_table_cls = UncountedEvictions


class SwappedSizesStorage(SlotStorage):
    """Broken: stores the K and V token counts swapped."""

    def write(self, slot, data, sizes):
        super().write(slot, data, tuple(reversed(sizes)))


class SwappedSizesPool(KVCachePool):
    def _allocate_storage(self, spec, *args, **kwargs):
        super()._allocate_storage(spec, *args, **kwargs)
        self._storage = SwappedSizesStorage(spec, self._capacity)


class GetReturnsViewPool(KVCachePool):
    """Broken: get() hands out the slot itself instead of a private copy."""

    def get(self, cache_key, out=None, *args, **kwargs):
        got = super().get(cache_key, out, *args, **kwargs)
        if got is None or out is not None:
            return got
        return self._storage.view(self._index.get(cache_key))


def _broken_machine(base, factory, check_order: bool = True):
    class Broken(base):
        CHECK_ORDER = check_order

        def make_pool(self, capacity):
            return factory(capacity)

    Broken.__name__ = f"Broken{base.__name__}"
    return Broken


BLACK_BOX = r"should have been evicted|pool\.keys|len\(pool\)|wrong data|in pool|should raise PoolExhaustedError"


@pytest.mark.parametrize(
    "base, factory, check_order, message",
    [
        # white-box: the order comparison catches it at once
        (FIFOMachine, lambda c: _make(FIFORewriteMovesToBack, c), True, "eviction order differs"),
        # black-box: only keys, evictions and data observed
        (FIFOMachine, lambda c: _make(FIFORewriteMovesToBack, c), False, BLACK_BOX),
        (PriorityMachine, lambda c: _make(LazyPriority, c), True, BLACK_BOX),
        # (evicting the pinned old version of a key being rewritten can also end in a KeyError)
        (FIFOMachine, lambda c: _make(EvictPinnedFIFO, c), False, BLACK_BOX + "|leased view|^[0-9]+$"),
        (LRUMachine, lambda c: _make("lru", c, DoubleUnpinPool), True, "negative pin|occupancy.pins"),
        (FIFOMachine, lambda c: _make("fifo", c, LeakFreedSlotPool), True, "free list|free \\+"),
        (FIFOMachine, lambda c: _make("fifo", c, UncountedEvictionPool), True, "stats.evictions"),
        (LRUMachine, lambda c: _make("lru", c, SwappedSizesPool), True, "has sizes"),
        (FIFOMachine, lambda c: _make("fifo", c, GetReturnsViewPool), True, "wrong data"),
    ],
    ids=[
        "fifo-rewrite-moves-whitebox",
        "fifo-rewrite-moves-blackbox",
        "lazy-priority-update",
        "evicts-pinned",
        "double-unpin",
        "leaked-free-slot",
        "uncounted-evictions",
        "swapped-sizes",
        "get-returns-view",
    ],
)
def test_state_machine_catches_broken_pools(base, factory, check_order, message):
    # InvariantError (from pool.check()) is an AssertionError too.
    with pytest.raises((AssertionError, KeyError), match=message):
        run_state_machine_as_test(_broken_machine(base, factory, check_order), settings=TEETH_SETTINGS)


def test_healthy_pool_passes_the_same_harness():
    """Control for the teeth tests: same settings, unbroken pool, no failure."""
    run_state_machine_as_test(
        _broken_machine(LRUMachine, lambda c: _make("lru", c)), settings=settings(TEETH_SETTINGS, max_examples=200)
    )


def test_double_unpin_fails_check_directly():
    pool = DoubleUnpinPool(2, eviction_strategy="fifo")
    pool.set(1, make_entry(1, 1))
    lease = pool.lease(1)
    lease.__enter__()
    pool.check()
    lease.__exit__(None, None, None)
    with pytest.raises(InvariantError, match="negative pin"):
        pool.check()


def test_leaked_free_slot_fails_check_directly():
    pool = LeakFreedSlotPool(2, eviction_strategy="fifo")
    pool.set(1, make_entry(1, 1))
    pool.check()
    pool.delete(1)
    with pytest.raises(InvariantError):
        pool.check()


def _healthy_pool() -> KVCachePool:
    """Capacity 4: keys 1, 2 live (2 leased and rewritten, so one slot retired), 1 slot free."""
    pool = KVCachePool(4, eviction_strategy="lru")
    pool.set(1, make_entry(1, 1))
    pool.set(2, make_entry(2, 2))
    lease = pool.lease(2)
    lease.__enter__()
    pool.set(2, make_entry(2, 3))  # leased: new slot, old one retired
    pool.check()
    occ = pool.occupancy()
    assert (occ.live, occ.free, occ.retired, occ.pinned, occ.pins) == (2, 1, 1, 1, 1)
    pool._test_lease = lease  # keep it alive
    return pool


def _a_live_slot(pool):
    return pool._index.get(1)


def _the_free_slot(pool):
    return list(pool._state.free)[-1]


CORRUPTIONS = {
    "free-slot-twice": lambda p: p._state.free.append(_the_free_slot(p)),
    "lost-free-slot": lambda p: p._state.free.pop(),
    "live-slot-on-free-list": lambda p: p._state.free.append(_a_live_slot(p)),
    "slot-key-mismatch": lambda p: p._state.slot_key.__setitem__(_a_live_slot(p), 2),
    "two-keys-one-slot": lambda p: p._index.__setitem__(2, _a_live_slot(p)),
    "free-slot-pinned": lambda p: p._state.pins.own.__setitem__(_the_free_slot(p), 1),
    "negative-pin": lambda p: p._state.pins.own.__setitem__(_a_live_slot(p), -1),
    "slot-out-of-range": lambda p: (p._state.free.pop(), p._state.free.append(99)),
    "policy-forgot-slot": lambda p: p._state.policy.remove(_a_live_slot(p)),
    "negative-stat": lambda p: setattr(p.stats, "hits", -1),
    "index-lost-key": lambda p: p._index.pop(1),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_check_detects_corrupted_bookkeeping(corruption):
    pool = _healthy_pool()
    CORRUPTIONS[corruption](pool)
    with pytest.raises(InvariantError):
        pool.check()
