"""concurrent_kv/shm.py: shared-memory segments (owner-only files, unguessable names, space, headers)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import stat

import pytest

from concurrent_kv import (
    AttachError,
    ClosedError,
    ConfigError,
    EntrySpec,
    KVCacheManager,
    KVCachePool,
    SharedMemoryError,
)
from concurrent_kv import shm
from concurrent_kv.shm import HEADER, Header, Segment, leftover_segments, remove_stale_segments, shm_dir
from concurrent_kv.workload import fill_entry, verify_entry

SPEC = EntrySpec(num_layers=1, num_samples=1, num_heads=2, max_tokens=4, head_dim=4)


@pytest.fixture
def pool():
    p = KVCachePool(4, shared=True, entry_spec=SPEC, name="shmtest")
    yield p
    p.close()


def test_segments_are_owner_only_with_unguessable_names(pool: KVCachePool) -> None:
    h = pool.handle()
    for path in (h.meta_path, h.data_path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o600, oct(mode)
        name = os.path.basename(path)
        assert name.startswith("ckv-") and len(name.split("-")[1]) == 32  # 128 random bits
    other = KVCachePool(4, shared=True, entry_spec=SPEC, name="shmtest")
    try:
        assert other.handle().meta_path != h.meta_path
    finally:
        other.close()


def test_handle_is_small_and_picklable(pool: KVCachePool) -> None:
    blob = pickle.dumps(pool.handle())
    assert len(blob) < 1024
    twin = KVCachePool.attach(pickle.loads(blob))
    try:
        pool.set(1, fill_entry(SPEC.empty_entry(), 1))
        assert verify_entry(twin.get(1), 1)
    finally:
        twin.close()
    assert verify_entry(pool.get(1), 1)  # a worker closing leaves the pool to its owner


def test_close_removes_files_and_keeps_stats_readable(pool: KVCachePool) -> None:
    h = pool.handle()
    pool.set(1, fill_entry(SPEC.empty_entry(), 1))
    pool.get(1)
    pool.close()
    assert not os.path.exists(h.meta_path) and not os.path.exists(h.data_path)
    assert pool.stats_snapshot().hits == 1
    with pytest.raises(ClosedError):
        pool.get(1)
    with pytest.raises(ClosedError):
        pool.handle()
    with pytest.raises(AttachError):
        KVCachePool.attach(h)  # its segments are gone


def test_attach_refuses_a_mismatched_layout(pool: KVCachePool) -> None:
    h = pool.handle()
    for change in ({"capacity": 8}, {"spec": (1, 1, 2, 4, 8, "torch.float32")},
                   {"spec": (1, 1, 2, 4, 4, "torch.float64")}, {"max_workers": 3}, {"policy": "lru"}):
        with pytest.raises(AttachError):
            KVCachePool.attach(dataclasses.replace(h, **change))


def test_attach_refuses_foreign_truncated_and_garbage_segments(tmp_path, pool: KVCachePool) -> None:
    h = pool.handle()
    folder = shm_dir()
    foreign = os.path.join(folder, "ckv-" + "0" * 32 + "-foreign")
    try:
        with open(foreign, "wb") as f:  # right name, garbage header
            f.write(os.urandom(4096))
        with pytest.raises(AttachError, match="magic"):
            KVCachePool.attach(dataclasses.replace(h, meta_path=foreign))
        with open(foreign, "wb") as f:  # truncated: shorter than a header
            f.write(b"CKV")
        with pytest.raises(AttachError, match="truncated"):
            KVCachePool.attach(dataclasses.replace(h, meta_path=foreign))
        with open(h.meta_path, "rb") as src, open(foreign, "wb") as f:  # a valid header, cut short
            f.write(src.read(HEADER.size + 100))
        with pytest.raises(AttachError):
            KVCachePool.attach(dataclasses.replace(h, meta_path=foreign))
    finally:
        os.unlink(foreign)
    with pytest.raises(AttachError):  # outside the shared-memory folder
        KVCachePool.attach(dataclasses.replace(h, meta_path=str(tmp_path / "ckv-x")))
    with pytest.raises(AttachError):
        KVCachePool.attach(dataclasses.replace(h, data_path=os.path.join(folder, "ckv-missing")))
    with pytest.raises(AttachError):
        KVCachePool.attach("not a handle")  # type: ignore[arg-type]
    assert pool.get(99) is None  # the real pool is untouched


def test_not_enough_shared_memory_fails_up_front(monkeypatch) -> None:
    class Tiny:
        f_bavail, f_frsize = 10, 4096

    label = f"tiny{os.getpid()}"
    monkeypatch.setattr(os, "statvfs", lambda path: Tiny)
    with pytest.raises(SharedMemoryError, match="needs"):
        KVCachePool(1000, shared=True, entry_spec=SPEC, name=label)
    assert not [n for n in leftover_segments() if label in n]


def test_shared_pool_needs_a_cpu_spec_and_a_known_lock() -> None:
    with pytest.raises(ConfigError):
        KVCachePool(4, shared=True)
    with pytest.raises(ConfigError):
        KVCachePool(4, shared=True, entry_spec=SPEC, lock=lambda name: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        KVCachePool(4, shared=True, entry_spec=EntrySpec(1, 1, 2, 4, 4, device="meta"))
    with pytest.raises(ConfigError):
        KVCachePool(4).handle()


def test_stale_segments_of_a_dead_owner_are_removable() -> None:
    seg = Segment.create("stale", 64, b"x")
    path = seg.path
    seg.close(unlink=False)
    with open(path, "r+b") as f:  # pretend its owner was a pid that no longer exists
        head = Header.read(f.read(HEADER.size))
        f.seek(0)
        f.write(HEADER.pack(*head._replace(owner_pid=2**22 + 12345)))
    assert os.path.basename(path) in remove_stale_segments()
    assert not os.path.exists(path)


def test_shared_manager_round_trip() -> None:
    cfg = {"num_simulations": 2, "num_layers": 1, "num_heads": 2, "embed_dim": 8, "context_length": 4}
    with KVCacheManager(cfg, 2, shared=True) as m:
        assert m.recur_pool.entry_spec == SPEC
        worker = KVCacheManager.attach(pickle.loads(pickle.dumps(m.handle())))
        worker.set_recur_cache(5, fill_entry(SPEC.empty_entry(), 5))
        worker.set_init_cache(1, 6, fill_entry(SPEC.empty_entry(), 6))
        assert verify_entry(m.hierarchical_get(1, 5), 5) and verify_entry(m.hierarchical_get(1, 6), 6)
        worker.close()
        m.check()
    with pytest.raises(ConfigError):
        KVCacheManager({"num_simulations": 2}, 2, shared=True)  # no entry shape
    with pytest.raises(ConfigError):
        KVCacheManager(cfg, 2).handle()
    with pytest.raises(AttachError):
        KVCacheManager.attach(object())  # type: ignore[arg-type]


def test_no_public_call_writes_outside_a_slot() -> None:
    """Oversized entries and token counts are refused; a lease view spans exactly its slot."""
    from concurrent_kv import EntryMismatchError

    with KVCachePool(3, shared=True, entry_spec=SPEC, name="bounds") as p:
        for k in range(3):
            p.set(k, fill_entry(SPEC.empty_entry(), k))
        big = EntrySpec(1, 1, 2, 8, 4).empty_entry()  # twice the tokens of a slot
        with pytest.raises(EntryMismatchError):
            p.set(1, big)
        tall = SPEC.empty_entry()
        tall[0]._k_cache._size = SPEC.max_tokens + 1
        with pytest.raises(EntryMismatchError):
            p.set(1, tall)
        with pytest.raises(EntryMismatchError):
            p.get(1, out=big)
        with p.lease(1) as view:
            assert view._block.numel() * view._block.element_size() == SPEC.nbytes
            view._block.fill_(999.0)  # misuse: scribbling on a leased view...
        assert verify_entry(p.get(0), 0) and verify_entry(p.get(2), 2)  # ...stays inside slot 1
        p.check()


def test_segment_helpers() -> None:
    assert shm.start_time(-1) == 0
    assert not shm.pid_alive(0) and not shm.pid_alive(2**22 + 1)
    assert shm.pid_alive(os.getpid()) and shm.pid_alive(os.getpid(), shm.start_time(os.getpid()))
    assert not shm.pid_alive(os.getpid(), started=1)  # a reused pid is not the process we knew
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    import time

    deadline = time.monotonic() + 5
    while shm.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not shm.pid_alive(pid)  # a zombie holds nothing
    os.waitpid(pid, 0)
    # A segment whose view is still exported closes without raising; the owner's exit hook
    # unlinks what was not closed.
    seg = shm.Segment.create("helpers", 64, b"d")
    assert seg.name.startswith("ckv-")
    held = seg.array(0, 1)  # a view the segment did not hand out
    seg.close()
    del held
    seg2 = shm.Segment.create("helpers", 64, b"d")
    shm._unlink_owned_at_exit()
    assert not os.path.exists(seg2.path)
    seg2.close()
    junk = os.path.join(shm.shm_dir(), "ckv-" + "1" * 32 + "-junk")
    with open(junk, "wb") as f:
        f.write(b"short")
    try:
        assert os.path.basename(junk) not in shm.remove_stale_segments()
    finally:
        os.unlink(junk)


# -- the reaper: files go when their owner does, however it ends -----------------------------


def _reaper(tmp_path):
    import subprocess
    import sys

    from concurrent_kv.reaper import REAPER_SCRIPT

    return subprocess.Popen([sys.executable, "-I", "-S", REAPER_SCRIPT, "0"], stdin=subprocess.PIPE, bufsize=0,
                            start_new_session=True)


def test_reaper_unlinks_what_is_still_listed_at_end_of_file(tmp_path) -> None:
    kept, gone, target = (tmp_path / n for n in ("kept", "gone", "target"))
    for p in (kept, gone, target):
        p.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(target)
    proc = _reaper(tmp_path)
    for line in (f"+{gone}", f"+{kept}", f"-{kept}", f"+{link}", f"+{tmp_path / 'never-made'}"):
        proc.stdin.write(line.encode() + b"\n")
    proc.stdin.close()  # what the kernel does when the owner dies
    assert proc.wait(10) == 0
    assert not gone.exists() and kept.exists()
    assert link.is_symlink() and target.exists()  # a link is never removed nor followed


def test_reaper_outlives_the_signals_of_a_dying_owner(tmp_path) -> None:
    import signal
    import time

    victim = tmp_path / "segment"
    victim.write_bytes(b"x")
    proc = _reaper(tmp_path)
    proc.stdin.write(f"+{victim}\n".encode())
    time.sleep(0.3)  # let it install its signal dispositions
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        proc.send_signal(sig)
    time.sleep(0.2)
    assert proc.poll() is None and victim.exists()
    proc.stdin.close()
    assert proc.wait(10) == 0 and not victim.exists()


def test_a_killed_reaper_is_replaced_and_told_everything(tmp_path) -> None:
    import signal
    import time

    from concurrent_kv.shm import pid_alive

    from concurrent_kv.reaper import OwnedPaths

    paths = OwnedPaths()
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"x")
    paths.add(str(first))
    old = paths.reaper_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(old) and time.monotonic() < deadline:  # dead, not yet reaped (a zombie)
        time.sleep(0.01)
    second.write_bytes(b"x")
    paths.add(str(second))
    assert paths.reaper_pid() not in (None, old)
    paths.stop_reaper()  # its pipe closes: the new reaper removes both
    assert not first.exists() and not second.exists()


def test_a_forked_child_neither_holds_nor_feeds_its_parents_reaper(pool: KVCachePool) -> None:
    from concurrent_kv.reaper import owned

    assert owned.reaper_pid() is not None and pool.handle().meta_path in owned.paths()
    pid = os.fork()
    if pid == 0:
        ok = owned.reaper_pid() is None and owned.paths() == []
        pool.close()  # a child never removes (nor unlists) its parent's files
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(pool.handle().meta_path) and pool.handle().meta_path in owned.paths()


def test_attach_refuses_the_segments_of_a_dead_owner(pool: KVCachePool) -> None:
    h = pool.handle()
    with open(h.meta_path, "r+b") as f:
        real = f.read(HEADER.size)
        for fake in (Header.read(real)._replace(owner_pid=2**22 + 12345),  # a pid that does not run
                     Header.read(real)._replace(owner_start=1)):  # our pid, reused: not the owner
            f.seek(0)
            f.write(HEADER.pack(*fake))
            f.flush()
            with pytest.raises(AttachError, match="owner .* is gone"):
                KVCachePool.attach(h)
        f.seek(0)
        f.write(real)


def test_a_process_forked_once_the_names_are_gone_still_works() -> None:
    """A worker that forks after its owner died (its reaper removed the names): the child gets
    its own lock descriptor through /proc/self/fd, not by the vanished name."""
    with KVCachePool(4, shared=True, entry_spec=SPEC, name="names-gone") as p:
        p.set(1, fill_entry(SPEC.empty_entry(), 1))
        h = p.handle()
        for path in (h.meta_path, h.data_path):
            os.unlink(path)  # what the reaper does when the owner dies
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                p.set(2, fill_entry(SPEC.empty_entry(), 2))
                code = 0 if verify_entry(p.get(1), 1) and verify_entry(p.get(2), 2) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert verify_entry(p.get(2), 2)
        p.check()
