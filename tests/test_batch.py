"""concurrent_kv/batch.py through the pool and the collector: lookup_many (pinned batches),
get_many, write_many (reserved batches) and set_many, on local and shared pools; with leases,
holds, a full pool, typed errors that change nothing, and the collector's batched calls."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

from concurrent_kv import (
    ClosedError,
    EntryMismatchError,
    EntrySpec,
    HolderError,
    InvalidEntryError,
    InvalidKeyError,
    InvalidPriorityError,
    KVCacheManager,
    KVCachePool,
    PoolExhaustedError,
)
from concurrent_kv.errors import ConfigError, EnvIdError

from .helpers import SMALL, LZKeysValues, is_entry_of, keyed_entry
from .validation_helpers import assert_entry, assert_rejected, entry, populated_pool


@pytest.fixture(params=[False, True], ids=["local", "shared"])
def small_pool(request):
    p = KVCachePool(4, entry_spec=SMALL, shared=request.param, name="batch")
    yield p
    p.close()


def block_of(kv) -> torch.Tensor:
    return kv._block


def sizes_of(kv) -> tuple:
    return tuple(c._size for c in kv._caches())


# -- lookup_many --------------------------------------------------------------------------------


def test_lookup_many_pins_hits_under_one_batch_and_counts_them(small_pool: KVCachePool) -> None:
    for k in (1, 2):
        small_pool.set(k, keyed_entry(k))
    with small_pool.lookup_many([2, 9, 1]) as batch:
        assert batch.keys == [2, 9, 1] and batch.slots[1] == -1 and batch.hits == 2
        assert torch.equal(batch.view(0), block_of(keyed_entry(2)))
        assert is_entry_of(batch.entry(2), 1) and batch.sizes(2) == sizes_of(keyed_entry(1))
        assert small_pool.occupancy().pins == 2
        assert batch.first_sizes() == [sizes_of(keyed_entry(2))[0], -1, sizes_of(keyed_entry(1))[0]]
        with pytest.raises(KeyError):
            batch.view(1)
    assert small_pool.occupancy().pins == 0
    with pytest.raises(ClosedError):
        batch.view(0)  # released: the slot may hold another entry now
    with pytest.raises(ClosedError):
        batch.first_sizes()
    batch.release()  # idempotent
    s = small_pool.stats_snapshot()
    assert (s.hits, s.misses) == (2, 1)
    small_pool.check()


def test_a_pinned_slot_is_neither_evicted_nor_overwritten(small_pool: KVCachePool) -> None:
    for k in range(4):
        small_pool.set(k, keyed_entry(k))
    batch = small_pool.lookup_many([0])
    small_pool.set(0, keyed_entry(100))  # rewriting a pinned key writes another slot
    for k in range(10, 12):  # evictions skip the pinned slot
        small_pool.set(k, keyed_entry(k))
    assert torch.equal(batch.view(0), block_of(keyed_entry(0)))
    batch.release()
    assert is_entry_of(small_pool.get(0), 100)
    small_pool.check()


def test_lookup_many_on_an_unsized_pool_misses_everything() -> None:
    pool = KVCachePool(max_bytes=1 << 20)
    with pool.lookup_many([1, 2]) as batch:
        assert batch.slots == [-1, -1]
    assert pool.stats_snapshot().misses == 2


@pytest.mark.parametrize("keys", [[1, -1], [1, "2"], [True], (1 << 64,), 5, None, {1, 2}])
def test_lookup_many_rejects_bad_keys_before_looking_anything_up(keys) -> None:
    pool = populated_pool()
    assert_rejected(pool, InvalidKeyError, TypeError, lambda: pool.lookup_many(keys))


# -- get_many -----------------------------------------------------------------------------------


def test_get_many_copies_hits_into_their_rows_and_leaves_misses(small_pool: KVCachePool) -> None:
    small_pool.set(5, keyed_entry(5))
    out = torch.full((3, *SMALL.block_shape), -1.0)
    sizes = small_pool.get_many([5, 6, 5], out)
    assert sizes == [sizes_of(keyed_entry(5)), None, sizes_of(keyed_entry(5))]
    assert torch.equal(out[0], block_of(keyed_entry(5))) and torch.equal(out[2], out[0])
    assert torch.all(out[1] == -1)
    assert small_pool.occupancy().pins == 0
    small_pool.check()


@pytest.mark.parametrize("out", [
    torch.zeros(2, 2, 1, 2, 4, 4),  # two rows for three keys
    torch.zeros(3, 4, 1, 2, 4, 4, dtype=torch.float64),
    torch.zeros(3, 4, 1, 2, 4, 5),
    "a tensor",
])
def test_get_many_rejects_a_wrong_out_and_changes_nothing(out) -> None:
    pool = populated_pool()
    assert_rejected(pool, EntryMismatchError, ValueError, lambda: pool.get_many([10, 11, 12], out))


# -- write_many ---------------------------------------------------------------------------------


def test_write_many_reserves_writes_and_publishes_on_commit(small_pool: KVCachePool) -> None:
    batch = small_pool.write_many([1, 2], [3, (1, 2, 3, 4)])
    assert len(small_pool) == 0  # nothing visible before the commit
    for i, k in enumerate((1, 2)):
        batch.view(i).copy_(block_of(keyed_entry(k)))
    assert batch.commit() == batch.slots
    assert [c for c in small_pool.get(2)._caches()][3]._size == 4 and small_pool.get(1).size == 3
    assert torch.equal(small_pool.get(1)._block, block_of(keyed_entry(1)))
    with pytest.raises(ClosedError):
        batch.commit()
    small_pool.check()


def test_a_key_given_twice_is_written_once_from_its_last_position(small_pool: KVCachePool) -> None:
    with small_pool.write_many([7, 8, 7], [1, 1, 2]) as batch:
        assert batch.slots[0] == batch.slots[2] != batch.slots[1]
        assert batch.view(0) is None and batch.positions() == [1, 2]
        batch.view(2).fill_(7.0)
        batch.view(1).fill_(8.0)
    assert small_pool.get(7).size == 2 and float(small_pool.get(7)._block[0, 0, 0, 0, 0]) == 7.0
    for k in (100, 101, 102):  # the oldest goes first: 8, stored before 7's last position
        small_pool.set(k, keyed_entry(k))
    assert 8 not in small_pool and 7 in small_pool
    small_pool.check()


def test_an_exception_in_the_block_stores_nothing_and_frees_the_slots(small_pool: KVCachePool) -> None:
    small_pool.set(1, keyed_entry(1))
    with pytest.raises(RuntimeError):
        with small_pool.write_many([1, 2], [1, 1]) as batch:
            batch.view(0).fill_(-5.0)
            raise RuntimeError("the caller failed mid-write")
    assert small_pool.keys() == [1] and is_entry_of(small_pool.get(1), 1)  # the old entry still served
    assert small_pool.occupancy().free == 3
    small_pool.check()


def test_a_stored_key_gets_a_new_slot_and_its_old_one_is_freed(small_pool: KVCachePool) -> None:
    old = small_pool.set(1, keyed_entry(1))
    with small_pool.lease(1) as leased:
        with small_pool.write_many([1], [sizes_of(keyed_entry(2))]) as batch:
            assert batch.slots[0] != old
            batch.view(0).copy_(block_of(keyed_entry(2)))
        assert is_entry_of(leased, 1)  # a lease keeps what it pinned
    assert is_entry_of(small_pool.get(1), 2)
    assert small_pool.stats_snapshot().updates == 1
    small_pool.check()


def test_a_full_pool_refuses_the_whole_batch_unless_partial(small_pool: KVCachePool) -> None:
    h = small_pool.add_holder()
    for k in (1, 2, 3):
        small_pool.set(k, keyed_entry(k), holder=h)
    small_pool.set(4, keyed_entry(4))  # the only evictable entry
    before = small_pool.stats_snapshot()
    with pytest.raises(PoolExhaustedError):
        small_pool.write_many([10, 11], [1, 1])
    assert small_pool.stats_snapshot() == before and sorted(small_pool.keys()) == [1, 2, 3, 4]  # nothing evicted
    with small_pool.write_many([10, 11], [1, 1], partial=True) as batch:
        assert batch.refused == 1 and batch.slots[1] == -1 and batch.view(1) is None
        batch.view(0).copy_(block_of(keyed_entry(10)))
    assert sorted(small_pool.keys()) == [1, 2, 3, 10]
    small_pool.check()


def test_write_many_holds_for_its_holder(small_pool: KVCachePool) -> None:
    a, b = small_pool.add_holder(), small_pool.add_holder()
    with small_pool.write_many([1, 2], [1, 1], holder=a) as batch:
        for i in batch.positions():
            batch.view(i).zero_()
    small_pool.set(3, keyed_entry(3), holder=b)
    assert small_pool.occupancy().held == 3
    assert small_pool.release(a) == 2 and small_pool.keys() == [3]
    small_pool.check()


def test_write_many_shapes_an_empty_pool_from_entry_spec() -> None:
    pool = KVCachePool(max_bytes=4 * SMALL.nbytes)
    with pytest.raises(EntryMismatchError, match="entry_spec"):
        pool.write_many([1], [1])
    with pool.write_many([1], [2], entry_spec=SMALL) as batch:
        batch.view(0).copy_(block_of(keyed_entry(1)))
    assert pool.capacity == 4 and pool.entry_spec == SMALL
    assert torch.equal(pool.get(1)._block, block_of(keyed_entry(1)))
    pool.check()


@pytest.mark.parametrize("call, exc, builtin", [
    (lambda p: p.write_many([1, 2], [1]), EntryMismatchError, ValueError),  # one size for two keys
    (lambda p: p.write_many([1], [99]), EntryMismatchError, ValueError),  # past max_tokens
    (lambda p: p.write_many([1], [(1, 2)]), EntryMismatchError, ValueError),  # two counts for four caches
    (lambda p: p.write_many([1], [True]), EntryMismatchError, ValueError),
    (lambda p: p.write_many([1], 1), EntryMismatchError, ValueError),
    (lambda p: p.write_many([-1], [1]), InvalidKeyError, TypeError),
    (lambda p: p.write_many([1], [1], priority=float("nan")), InvalidPriorityError, ValueError),
    (lambda p: p.write_many([1], [1], holder=99), HolderError, ValueError),
    (lambda p: p.write_many([1], [1], partial=1), ConfigError, ValueError),
    (lambda p: p.write_many([1], [1], entry_spec="spec"), ConfigError, ValueError),
    (lambda p: p.write_many([1], [1], entry_spec=EntrySpec(1, 1, 1, 1, 1)), EntryMismatchError, ValueError),
])
def test_write_many_rejects_bad_input_and_changes_nothing(call, exc, builtin) -> None:
    pool = populated_pool()
    assert_rejected(pool, exc, builtin, lambda: call(pool))


def test_a_commit_after_close_stores_nothing() -> None:
    pool = KVCachePool(2, entry_spec=SMALL)
    batch = pool.write_many([1], [1])
    done = threading.Event()
    closer = threading.Thread(target=lambda: (pool.close(), done.set()))
    closer.start()  # close() waits for the batch in flight ...
    assert not done.wait(0.2)
    with pytest.raises(ClosedError):
        batch.commit()  # ... which finds the pool closed and hands its slot back
    closer.join(5)
    assert done.is_set()


# -- set_many -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ours", "lightzero_like", "tensor"])
def test_set_many_copies_a_batch_in_one_call(small_pool: KVCachePool, kind: str) -> None:
    keys = [1, 2, 3]
    ours = [keyed_entry(k) for k in keys]
    if kind == "ours":
        slots = small_pool.set_many(keys, ours)
    elif kind == "lightzero_like":
        foreign = []
        for kv in ours:
            lz = LZKeysValues(1, SMALL.num_heads, SMALL.max_tokens, SMALL.num_heads * SMALL.head_dim, SMALL.num_layers)
            for dst, src in zip([c for l in lz._keys_values for c in (l._k_cache, l._v_cache)], kv._caches()):
                dst._cache.copy_(src._cache)
                dst._size = src._size
            foreign.append(lz)
        slots = small_pool.set_many(keys, foreign)
    else:
        sizes = [sizes_of(kv) for kv in ours]
        slots = small_pool.set_many(keys, torch.stack([kv._block for kv in ours]), sizes)
    assert sorted(slots) == sorted(set(slots)) and len(slots) == 3
    for k in keys:
        assert is_entry_of(small_pool.get(k), k)
    small_pool.check()


@pytest.mark.parametrize("form", ["tensors", "batch"])
def test_set_many_from_token_prefixes_writes_only_those_tokens(small_pool: KVCachePool, form: str) -> None:
    """Entries given as their first tokens (at least the valid ones): the rest of each slot is
    left as it was, which a reader never looks at."""
    for k in (1, 2):
        small_pool.set(k, keyed_entry(k))
    fresh = torch.stack([torch.full(SMALL.block_shape, 9.0)[..., :2, :], torch.full(SMALL.block_shape, 8.0)[..., :2, :]])
    entries = list(fresh) if form == "tensors" else fresh
    slots = small_pool.set_many([1, 2], entries, [2, (1, 2, 2, 0)])
    assert -1 not in slots
    one, two = small_pool.get(1), small_pool.get(2)
    assert torch.all(one._block[..., :2, :] == 9.0) and torch.all(two._block[..., :2, :] == 8.0)
    assert [c._size for c in two._caches()] == [1, 2, 2, 0]
    small_pool.check()


@pytest.mark.parametrize("entries, sizes", [
    ([torch.zeros(4, 1, 2, 2, 4)], [3]),  # 3 valid tokens, 2 given
    ([torch.zeros(4, 1, 2, 9, 4)], [1]),  # longer than a slot
    ([torch.zeros(4, 1, 3, 2, 4)], [1]),  # another head count
    ([torch.zeros(4, 1, 2, 2, 4, dtype=torch.float64)], [1]),
    ([torch.zeros(4, 1, 2, 2, 4, device="meta")], [1]),
    ([torch.zeros(4, 1, 2, 2, 4)], None),
    (torch.zeros(1, 4, 1, 2, 2, 4), [3]),
])
def test_set_many_refuses_prefixes_that_do_not_fit(entries, sizes) -> None:
    pool = populated_pool()
    assert_rejected(pool, EntryMismatchError, ValueError, lambda: pool.set_many([1], entries, sizes))


def test_prefixes_need_the_slots_shape_first() -> None:
    pool = KVCachePool(2)
    with pytest.raises(EntryMismatchError, match="entry_spec"):
        pool.set_many([1], [torch.zeros(4, 1, 2, 2, 4)], [1])
    spec = EntrySpec(2, 1, 2, 4, 4)
    assert pool.set_many([1], [torch.ones(4, 1, 2, 2, 4)], [2], entry_spec=spec) == [0]
    assert pool.entry_spec == spec and pool.get(1).size == 2


@pytest.mark.parametrize("entries, sizes, exc, builtin", [
    ([entry(1.0), "not an entry"], None, InvalidEntryError, TypeError),
    ([entry(1.0), entry(2.0, layers=3)], None, EntryMismatchError, ValueError),
    ([entry(1.0)], None, InvalidEntryError, TypeError),  # one entry for two keys
    ([entry(1.0), entry(2.0)], [1, 1], ConfigError, ValueError),
    (torch.zeros(2, 4, 1, 2, 4, 4), None, EntryMismatchError, ValueError),  # no sizes
    (torch.zeros(2, 4, 1, 2, 4, 4), [9, 9], EntryMismatchError, ValueError),
    (torch.zeros(2, 2, 1, 2, 4, 4), [1, 1], EntryMismatchError, ValueError),
])
def test_set_many_validates_the_whole_batch_first(entries, sizes, exc, builtin) -> None:
    pool = populated_pool()
    assert_rejected(pool, exc, builtin, lambda: pool.set_many([1, 2], entries, sizes))


def test_set_many_on_an_empty_pool_takes_the_entries_shape() -> None:
    pool = KVCachePool(3)
    pool.set_many([1, 2], [entry(1.0), entry(2.0)])
    assert_entry(pool.get(2), 2.0)
    tensor_pool = KVCachePool(3)
    tensor_pool.set_many([1], torch.ones(1, 4, 1, 2, 4, 4), [2])
    assert tensor_pool.entry_spec is not None and tensor_pool.entry_spec.num_layers == 2
    assert tensor_pool.get(1).size == 2


def test_an_empty_batch_for_a_pool_without_slots_is_refused() -> None:
    pool = KVCachePool(3)
    with pytest.raises(EntryMismatchError):
        pool.set_many([], [])
    assert pool.entry_spec is None and len(pool) == 0
    assert pool.set_many([], [], entry_spec=SMALL) == [] and pool.entry_spec == SMALL


def test_a_copy_that_fails_under_the_lock_stores_nothing_and_frees_its_slots(monkeypatch) -> None:
    pool = populated_pool()
    before = {k: pool.get(k) for k in pool.keys()}

    def broken(dst, src):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(torch, "_foreach_copy_", broken)
    with pytest.raises(RuntimeError):
        pool.set_many([7], [entry(7.0)])
    monkeypatch.undo()
    assert sorted(pool.keys()) == sorted(before) and 7 not in pool
    assert pool.occupancy().free == 1 and pool.occupancy().pins == 0
    for k, kv in before.items():
        assert torch.equal(pool.get(k)._block, kv._block)
    pool.check()


def test_the_seams_unchecked_store_still_refuses_another_spec() -> None:
    """CollectorCaches._store_recur_views skips the per-entry checks, not the spec comparison."""
    m = KVCacheManager({"init_pool_size": 2, "recur_pool_size": 3, "wm_pool_size": 1}, 1, entry_spec=SMALL)
    c = m.collector(0, 1)
    other = EntrySpec(SMALL.num_layers, 1, SMALL.num_heads, SMALL.max_tokens, SMALL.head_dim * 2)
    with pytest.raises(EntryMismatchError):
        c._store_recur_views([5], [torch.zeros(*other.block_shape)], [(1,) * (2 * other.num_layers)], other)
    assert len(m.recur_pool) == 0 and c.rejected == 0
    views = [keyed_entry(5)._block]
    assert c._store_recur_views([5], views, [sizes_of(keyed_entry(5))], SMALL) == [0]
    assert is_entry_of(m.recur_pool.get(5), 5) and m.recur_pool.occupancy().held == 1
    c.close()
    m.check()
    m.close()


def test_batches_interleave_with_single_calls_from_threads() -> None:
    pool = KVCachePool(64, entry_spec=SMALL)
    errors = []

    def worker(base: int) -> None:
        try:
            for r in range(30):
                keys = [base + 10 * r + i for i in range(4)]
                pool.set_many(keys, [keyed_entry(k) for k in keys])
                with pool.lookup_many(keys) as batch:
                    for i, k in enumerate(keys):
                        if batch.slots[i] >= 0:
                            assert is_entry_of(batch.entry(i), k)
                pool.set(base + 5000 + r, keyed_entry(base + 5000 + r))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(100_000 * (t + 1),)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert pool.occupancy().pins == 0
    pool.check()


# -- shared pools, across processes ---------------------------------------------------------------


def _worker_writes(handle, keys) -> None:
    pool = KVCachePool.attach(handle)
    pool.set_many(keys, [keyed_entry(k) for k in keys])
    with pool.write_many([k + 1000 for k in keys], [1] * len(keys)) as batch:
        for i in batch.positions():
            batch.view(i).copy_(keyed_entry(keys[i] + 1000)._block)
    pool.close()


def test_a_worker_process_writes_batches_the_parent_reads() -> None:
    with KVCachePool(8, entry_spec=SMALL, shared=True, name="batch-proc") as pool:
        ctx = mp.get_context("fork")
        p = ctx.Process(target=_worker_writes, args=(pool.handle(), [1, 2, 3]))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        with pool.lookup_many([1, 2, 3, 1001]) as batch:
            assert batch.hits == 4
            assert is_entry_of(batch.entry(0), 1) and is_entry_of(batch.entry(2), 3)
            assert torch.equal(batch.view(3), keyed_entry(1001)._block)
        pool.check()


def test_token_prefix_views_are_made_once_and_move_only_those_tokens(small_pool: KVCachePool) -> None:
    small_pool.set(1, keyed_entry(1))
    with small_pool.lookup_many([1]) as batch:
        head = batch.view(0, 2)
        assert head.shape[-2] == 2 and head is batch.view(0, 2)  # kept, not rebuilt
        assert torch.equal(head, batch.view(0)[..., :2, :])
        assert batch.view(0, SMALL.max_tokens) is batch.view(0)
    with small_pool.write_many([2], [2]) as write:
        write.view(0).fill_(-1.0)
        write.view(0, 2).fill_(5.0)
    got = small_pool.get(2)._block
    assert torch.all(got[..., :2, :] == 5.0) and torch.all(got[..., 2:, :] == -1.0)


# -- the collector's batched calls ---------------------------------------------------------------


def test_collector_batches_hold_count_foreign_hits_and_refusals() -> None:
    m = KVCacheManager({"init_pool_size": 2, "recur_pool_size": 3, "wm_pool_size": 1}, 2, entry_spec=SMALL)
    a, b = m.collector(0, 1), m.collector(1, 1)
    batch = a.write_recur_many([1, 2], [1, 1])
    for i in batch.positions():
        batch.view(i).copy_(keyed_entry(i + 1)._block)
    assert a.commit(batch) == batch.slots
    with b.pin_recur_many([1, 2, 3]) as pinned:
        assert pinned.hits == 2
    assert b.foreign_hits == 2 and a.foreign_hits == 0
    refused = b.write_recur_many([7, 8], [1, 1])  # one slot left: a's two entries are held
    assert refused.refused == 1 and b.rejected == 1
    b.commit(refused)
    root = a.write_init(0, 42, sizes_of(keyed_entry(42)))
    root.view(0).copy_(keyed_entry(42)._block)
    a.commit(root)
    with a.pin_init(0, 42) as pinned:
        assert is_entry_of(pinned.entry(0), 42)
    roots = a.pin_roots([42])
    assert [r.hits for r in roots] == [1] and is_entry_of(roots[0].entry(0), 42)
    roots[0].release()
    assert [r.hits for r in b.pin_roots([42])] == [0]  # b's env 0 is the manager's env 1
    with pytest.raises(EnvIdError):
        a.pin_roots([1, 2])
    with pytest.raises(InvalidKeyError):
        a.pin_roots(["42"])
    b.clear_recur_cache()
    assert 1 in m.recur_pool and 2 in m.recur_pool  # a's holds survive b's clear
    slots = b.set_recur_many([30, 31], torch.zeros(2, *SMALL.block_shape), [1, 1])
    assert slots[0] >= 0 and slots[1] == -1 and b.rejected == 2  # one slot was free
    assert m.recur_pool.occupancy().held == 3
    b.clear_recur_cache()
    assert 30 not in m.recur_pool
    a.close()
    b.close()
    m.check()
    m.close()
