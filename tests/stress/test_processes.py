"""Shared pools across worker processes: attach by handle, self-checking stress, SIGKILL faults.

Every test checks that nothing of ours is left in /dev/shm and that no descriptor leaked.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time

import pytest

from concurrent_kv import EntrySpec, KVCachePool
from concurrent_kv.workload import WorkloadConfig, fill_entry, make_manager, run_processes, verify_entry

from ..helpers import segment_fds
from . import mp_workers

pytestmark = pytest.mark.stress
SPEC = EntrySpec(num_layers=2, num_samples=1, num_heads=2, max_tokens=4, head_dim=8)
ATARI = EntrySpec(num_layers=2, num_samples=1, num_heads=8, max_tokens=8, head_dim=96)
SECONDS = float(os.environ.get("STRESS_SECONDS", "1.5"))
RECOVERY_BOUND_S = 1.0


@pytest.fixture
def no_leaks():
    """Fail if the test leaves a segment of its own behind or leaks descriptors.

    Only this test's segments are checked (other xdist workers create their own meanwhile)."""
    made = []
    yield made
    paths = [p for pool in made for p in (pool.handle().meta_path, pool.handle().data_path)]
    for pool in made:
        pool.close()
    left = [p for p in paths if os.path.exists(p)]
    assert not left, f"segments left in /dev/shm: {left}"
    assert not [t for t in segment_fds() if any(t.endswith(os.path.basename(p)) for p in paths)], segment_fds()


def _pool(made: list, capacity: int = 16, strategy: str = "fifo", spec: EntrySpec = SPEC) -> KVCachePool:
    pool = KVCachePool(capacity, strategy, shared=True, entry_spec=spec, name="stress", lock_timeout=10.0)
    made.append(pool)
    return pool


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_worker_attaches_by_handle_and_reads_bit_identical(method: str, no_leaks: list) -> None:
    pool = _pool(no_leaks, spec=ATARI)
    entry = ATARI.empty_entry()
    entry._block.normal_()
    for i, c in enumerate(c for layer in entry._keys_values for c in (layer._k_cache, layer._v_cache)):
        c._size = i + 2
    pool.set(42, entry)
    ctx = mp.get_context(method)
    out = ctx.Queue()
    proc = ctx.Process(target=mp_workers.read_digest, args=(pool.handle(), 42, out))
    proc.start()
    digest, sizes = out.get(timeout=60)
    proc.join(30)
    assert proc.exitcode == 0
    assert digest == hashlib.sha256(entry._block.numpy().tobytes()).hexdigest()
    assert sizes == (2, 3, 4, 5)
    pool.check()


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("strategy,processes", [("fifo", 2), ("lru", 3), ("priority", 4)])
def test_processes_and_threads_verify_every_read_and_add_up(method: str, strategy: str, processes: int,
                                                            no_leaks: list) -> None:
    pool = _pool(no_leaks, capacity=24, strategy=strategy)
    ctx = mp.get_context(method)
    out = ctx.Queue()
    procs = [ctx.Process(target=mp_workers.hammer, args=(pool.handle(), SPEC, p + 1, 3, SECONDS, 40, out))
             for p in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=SECONDS + 90) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    totals = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    assert [e for r in results for e in r[1]] == []
    assert totals["corrupt"] == 0
    assert totals["ops"] > 100 * processes
    stats = pool.stats_snapshot()
    assert (stats.hits, stats.misses) == (totals["hits"], totals["misses"])  # no lost increment
    assert stats.inserts + stats.updates == totals["sets"]
    pool.check()
    assert pool.occupancy().pins == 0


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def test_sigkill_while_holding_the_pool_lock(no_leaks: list) -> None:
    pool = _pool(no_leaks)
    pool.set(1, fill_entry(SPEC.empty_entry(), 1))
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=mp_workers.hold_lock_forever, args=(pool.handle(), ready))
    proc.start()
    assert ready.wait(30)
    pool._timeout = 0.3
    with pytest.raises(Exception):  # the lock is really held: we time out
        pool.set(2, fill_entry(SPEC.empty_entry(), 2))
    pool._timeout = 10.0
    _kill(proc)
    start = time.monotonic()
    pool.set(2, fill_entry(SPEC.empty_entry(), 2))
    got = pool.get(1)
    elapsed = time.monotonic() - start
    assert elapsed < RECOVERY_BOUND_S, f"service resumed after {elapsed:.3f} s"
    assert got is not None and verify_entry(got, 1)
    pool.check()


@pytest.mark.parametrize("rewrite", [False, True], ids=["new-key", "rewrite"])
def test_sigkill_halfway_through_writing_a_slot(rewrite: bool, no_leaks: list) -> None:
    pool = _pool(no_leaks, capacity=4)
    for k in (1, 2):
        pool.set(k, fill_entry(SPEC.empty_entry(), k))
    key = 2 if rewrite else 7
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=mp_workers.die_mid_write, args=(pool.handle(), SPEC, key, ready))
    proc.start()
    assert ready.wait(30)
    _kill(proc)
    start = time.monotonic()
    got = pool.get(key)  # the next lock holder repairs the pool first
    elapsed = time.monotonic() - start
    assert elapsed < RECOVERY_BOUND_S
    assert got is None, "a half-written entry was served"
    assert verify_entry(pool.get(1), 1)
    assert rewrite or verify_entry(pool.get(2), 2)
    pool.check()
    occ = pool.occupancy()
    # The half-written slot is free again; a rewritten key is gone, never half-served.
    assert (occ.live, occ.free) == ((1, 3) if rewrite else (2, 2))
    # The pool keeps working: fill it completely.
    for k in range(10, 14):
        pool.set(k, fill_entry(SPEC.empty_entry(), k))
    assert all(verify_entry(pool.get(k), k) for k in range(10, 14))
    pool.check()


def test_sigkill_while_holding_leases(no_leaks: list) -> None:
    pool = _pool(no_leaks, capacity=4)
    for k in range(4):
        pool.set(k, fill_entry(SPEC.empty_entry(), k))
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=mp_workers.hold_leases_forever, args=(pool.handle(), [0, 1, 2, 3], ready))
    proc.start()
    assert ready.wait(30)
    assert pool.occupancy().pins == 4
    _kill(proc)
    start = time.monotonic()
    # Every slot is pinned by the dead worker: the set finds no victim, reaps, and proceeds.
    pool.set(100, fill_entry(SPEC.empty_entry(), 100))
    elapsed = time.monotonic() - start
    assert elapsed < RECOVERY_BOUND_S
    assert pool.occupancy().pins == 0
    assert verify_entry(pool.get(100), 100)
    pool.check()


def test_dead_workers_pins_are_reclaimed_by_recover(no_leaks: list) -> None:
    pool = _pool(no_leaks, capacity=4)
    pool.set(0, fill_entry(SPEC.empty_entry(), 0))
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=mp_workers.hold_leases_forever, args=(pool.handle(), [0], ready))
    proc.start()
    assert ready.wait(30)
    pid = proc.pid
    _kill(proc)
    assert pool.recover() == [pid]
    assert pool.occupancy().pins == 0
    pool.delete(0)
    pool.check()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_manager_shared_with_worker_processes(method: str) -> None:
    cfg = WorkloadConfig(env_num=4, collectors=4, num_simulations=8, steps=5, episode_length=3,
                         num_layers=2, num_heads=2, context_length=4, head_dim=8, shared_keys=0.3)
    with make_manager(cfg, shared=True) as manager:
        paths = [p for h in manager.handle().pools for p in (h.meta_path, h.data_path)]
        result = run_processes(manager, cfg, 2, method, timeout_s=120)
        assert result.total.errors == []
        assert result.total.corrupt == 0 and result.total.verified == result.total.hits > 0
        assert result.total.foreign_hits > 0  # entries written by the other process were read
        manager.check()
    assert [p for p in paths if os.path.exists(p)] == []


def test_forked_child_uses_an_inherited_pool_safely(no_leaks: list) -> None:
    """A pool object inherited through fork gets its own lock descriptor and worker row."""
    pool = _pool(no_leaks)
    pool.set(1, fill_entry(SPEC.empty_entry(), 1))
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            got = pool.get(1)
            pool.set(2, fill_entry(SPEC.empty_entry(), 2, 5))
            code = 0 if got is not None and verify_entry(got, 1) else 2
            pool.close()  # a child never removes the parent's segments
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert verify_entry(pool.get(2), 2)
    assert pool.stats_snapshot().hits == 2  # the child's hit is counted on its own row
    pool.check()


def test_multiprocess_doc_example_runs(tmp_path) -> None:
    """docs/multiprocess.md's example, run as a script (spawn needs an importable main)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "multiprocess.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
