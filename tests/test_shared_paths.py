"""concurrent_kv/pool.py with shared=True (and state.py): crash repair, failure paths, lock timeouts.

Shared pools in one process, split writes included. The multiprocess and SIGKILL versions live in
tests/stress; these reach the same code deterministically, without processes.
"""

from __future__ import annotations

import os
import threading

import pytest

from concurrent_kv import (
    AttachError,
    ClosedError,
    ConfigError,
    EntryMismatchError,
    EntrySpec,
    InvariantError,
    KVCacheManager,
    KVCachePool,
    LockTimeoutError,
    SharedMemoryError,
)
from concurrent_kv import shm
from concurrent_kv.state import DIRTY, RETIRED, WRITING
from concurrent_kv.workload import entry_writer, fill_entry, verify_entry

SPEC = EntrySpec(num_layers=1, num_samples=1, num_heads=2, max_tokens=4, head_dim=4)


def entry(key: int):
    return fill_entry(SPEC.empty_entry(), key)


@pytest.fixture(params=["fifo", "lru", "priority"])
def pool(request):
    p = KVCachePool(6, request.param, shared=True, entry_spec=SPEC, name="paths")
    yield p
    p.close()


def test_repair_drops_a_half_written_slot_and_rebuilds_order(pool: KVCachePool) -> None:
    for k in range(4):
        pool.set(k, entry(k), priority=float(k))
    order_before = [pool._state.slot_key[s] for s in pool._state.policy.order()]
    # A writer "died" after marking slot of key 3 WRITING, with the pool marked dirty.
    slot3 = pool._index.get(3)
    pool._state.slot_state[slot3] = WRITING
    pool._state.scalars[DIRTY] = 12345
    pool._state.policy.clear()  # and with the eviction links torn
    assert pool.get(3) is None  # the next lock holder repairs first; 3 is never served
    assert pool._state.scalars[DIRTY] == 0
    pool.check()
    assert [pool._state.slot_key[s] for s in pool._state.policy.order()] == [k for k in order_before if k != 3]
    assert all(verify_entry(pool.get(k), k) for k in range(3))
    for k in range(10, 14):  # and it keeps working, evicting in the rebuilt order
        pool.set(k, entry(k), priority=100.0)
    pool.check()


def test_repair_keeps_one_slot_per_key_and_counts_retired(pool: KVCachePool) -> None:
    for k in range(3):
        pool.set(k, entry(k))
    s0, s1, s2 = (pool._index.get(k) for k in range(3))
    pool._state.slot_key[s1] = 0  # a crash between publish and retire left key 0 twice READY
    pool._state.slot_state[s2] = RETIRED  # and a retired slot (no pins: reusable)
    pool._state.scalars[DIRTY] = 1
    got = pool.get(0)
    assert got is not None and verify_entry(got, 0)
    occ = pool.occupancy()
    assert occ.live == 1 and occ.retired == 1
    pool.set(20, entry(20))  # the free stack was rebuilt
    pool.check()


def test_recover_on_demand_and_on_a_local_pool() -> None:
    assert KVCachePool(2).recover() == []
    p = KVCachePool(2, shared=True, entry_spec=SPEC)
    try:
        assert p.recover() == []
    finally:
        p.close()


def test_a_failed_copy_never_leaves_a_half_written_entry(monkeypatch) -> None:
    for shared in (False, True):
        p = KVCachePool(3, shared=shared, entry_spec=SPEC)
        try:
            p.set(1, entry(1))
            p.set(2, entry(2))

            def broken(*args, **kwargs):
                raise RuntimeError("copy failed")

            monkeypatch.setattr(p._storage, "write", broken)
            with pytest.raises(RuntimeError):
                p.set(1, entry(1))  # a rewrite: the key goes rather than serve a torn value
            with pytest.raises(RuntimeError):
                p.set(3, entry(3))  # a new key: its slot goes back to the free stack
            monkeypatch.undo()
            assert 1 not in p and 3 not in p and verify_entry(p.get(2), 2)
            p.check()
            assert p.occupancy().free == 2
        finally:
            p.close()


def test_fault_hook_is_called_at_the_writing_point() -> None:
    points = []
    p = KVCachePool(2)
    p._fault = points.append
    p.set(1, entry(1))
    assert points == ["writing"]


def test_shared_pool_lock_timeouts_raise_typed_errors() -> None:
    p = KVCachePool(2, shared=True, entry_spec=SPEC, lock_timeout=0.2)
    other = KVCachePool.attach(p.handle())
    try:
        p.set(1, entry(1))
        held = other._lock.acquire_write(1.0)  # another "process" holds the flock exclusively
        try:
            with pytest.raises(LockTimeoutError, match="shared"):
                p.get(1)
            with pytest.raises(LockTimeoutError, match="exclusive"):
                p.set(2, entry(2))
        finally:
            held.release()
        assert verify_entry(p.get(1), 1)
    finally:
        other.close()
        p.close()


def test_mutex_shared_pool_reads_exclusively() -> None:
    p = KVCachePool(2, shared=True, entry_spec=SPEC, lock="mutex", lock_timeout=0.2)
    try:
        p.set(1, entry(1))
        assert verify_entry(p.get(1), 1)
    finally:
        p.close()


def test_shared_construction_failures_leave_nothing(monkeypatch) -> None:
    label = f"fail{os.getpid()}"
    with pytest.raises(ConfigError):
        KVCachePool(2, shared="yes", entry_spec=SPEC)  # type: ignore[arg-type]
    with pytest.raises(EntryMismatchError):
        KVCachePool(max_bytes=10, shared=True, entry_spec=SPEC, name=label)
    real_create = shm.Segment.create
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SharedMemoryError("no room for the meta segment")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(shm.Segment, "create", second_fails)
    with pytest.raises(SharedMemoryError):
        KVCachePool(2, shared=True, entry_spec=SPEC, name=label)
    monkeypatch.undo()

    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(SharedMemoryError, match="reserve"):
        KVCachePool(2, shared=True, entry_spec=SPEC, name=label)
    monkeypatch.undo()
    assert not [n for n in shm.leftover_segments() if label in n]


def test_manager_construction_failure_closes_the_pools_made(monkeypatch) -> None:
    label_pools = []
    real_init = KVCachePool.__init__

    def third_fails(self, *args, **kwargs):
        if len(label_pools) == 2:
            raise SharedMemoryError("out of shared memory")
        real_init(self, *args, **kwargs)
        label_pools.append(self)

    monkeypatch.setattr(KVCachePool, "__init__", third_fails)
    with pytest.raises(SharedMemoryError):
        KVCacheManager({"num_simulations": 2}, 3, shared=True, entry_spec=SPEC)
    monkeypatch.undo()
    assert all(p.closed for p in label_pools)
    assert not any(os.path.exists(p._parts.handle.meta_path) for p in label_pools)
    with pytest.raises(ConfigError):
        KVCacheManager({}, 2, shared=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        KVCacheManager({}, 2, entry_spec="spec")  # type: ignore[arg-type]


def test_manager_attach_failure_closes_what_it_attached() -> None:
    m = KVCacheManager({"num_simulations": 2}, 2, shared=True, entry_spec=SPEC)
    h = m.handle()
    broken = type(h)(h.config, h.env_num, h.enable_stats, h.pools[:-1] + (h.pools[0].__class__(
        **{**h.pools[-1].__dict__, "meta_path": h.pools[-1].meta_path + "-gone"}),))
    with pytest.raises(AttachError):
        KVCacheManager.attach(broken)
    m.close()
    with pytest.raises(Exception):
        m.handle()


# -- split writes: a shared pool copies a new entry outside its exclusive lock ----------------


class StalledWrite:
    """``pool.set(key, ...)`` in a thread, held at the copy point until ``go()``."""

    def __init__(self, pool: KVCachePool, key: int, value: int) -> None:
        self.copying, self._go = threading.Event(), threading.Event()
        self.result: list = []
        waiting = [True]

        def hook(point: str) -> None:
            if point == "writing" and waiting[0] and threading.current_thread() is self.thread:
                waiting[0] = False
                self.copying.set()
                assert self._go.wait(10)

        pool._fault = hook

        def body() -> None:
            try:
                self.result.append(pool.set(key, entry(value)))
            except BaseException as exc:
                self.result.append(exc)

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        assert self.copying.wait(10)

    def go(self) -> object:
        self._go.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.result[0]


def test_a_copying_writer_blocks_no_one_and_publishes_when_done() -> None:
    with KVCachePool(4, shared=True, entry_spec=SPEC, lock_timeout=2.0) as p:
        p.set(1, entry(1))
        stalled = StalledWrite(p, 7, 7)
        # Mid-copy: readers, writers and the audit all get the exclusive lock at once.
        assert verify_entry(p.get(1), 1)
        p.set(2, entry(2))
        assert 7 not in p and p.get(7) is None  # not published yet
        p.check()  # the in-flight slot is WRITING and pinned by its writer: allowed
        occ = p.occupancy()
        assert (occ.live, occ.free, occ.pinned) == (2, 1, 1)
        slot = stalled.go()
        assert isinstance(slot, int) and verify_entry(p.get(7), 7)
        p.check()
        assert p.occupancy().free == 1 and p.stats_snapshot().inserts == 3


def test_two_writers_of_one_new_key_leave_the_later_value_and_no_leak() -> None:
    with KVCachePool(4, shared=True, entry_spec=SPEC) as p:
        stalled = StalledWrite(p, 5, 5)
        p.set(5, fill_entry(SPEC.empty_entry(), 5, writer=2))  # published first
        stalled.go()  # published second: its value wins, the first slot is freed
        got = p.get(5)
        assert verify_entry(got, 5) and entry_writer(got) == 0
        s = p.stats_snapshot()
        assert (s.inserts, s.updates) == (1, 1)
        p.check()
        assert (p.occupancy().live, p.occupancy().free) == (1, 3)


def test_a_write_waits_for_slots_reserved_by_writes_in_flight() -> None:
    with KVCachePool(1, shared=True, entry_spec=SPEC, lock_timeout=5.0) as p:
        stalled = StalledWrite(p, 1, 1)
        later = threading.Thread(target=lambda: p.set(2, entry(2)))
        later.start()  # the only slot is reserved: this set waits instead of failing
        later.join(0.3)
        assert later.is_alive()
        stalled.go()
        later.join(10)
        assert not later.is_alive() and verify_entry(p.get(2), 2) and 1 not in p
        p.check()


def test_close_waits_for_a_copying_writer_which_then_fails_cleanly() -> None:
    p = KVCachePool(2, shared=True, entry_spec=SPEC, lock_timeout=5.0)
    stalled = StalledWrite(p, 3, 3)
    closer = threading.Thread(target=p.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waiting for the copy to finish
    assert isinstance(stalled.go(), ClosedError)
    closer.join(10)
    assert p.closed


def test_check_reports_a_writing_slot_with_no_writer(pool: KVCachePool) -> None:
    pool.set(1, entry(1))
    free = pool._state.free.pop()
    pool._state.slot_state[free] = WRITING  # reserved, but by no one (and no dead worker to reap)
    with pytest.raises(InvariantError, match="no writer"):
        pool._slots.audit()
    pool.check()  # the public audit sweeps first: such a slot is freed
    assert pool.occupancy().free == 5
