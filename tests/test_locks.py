"""concurrent_kv/locks.py: the pool locks alone (who holds them together, who waits, what a timeout leaves).

Every lock kind a pool accepts is tested through the same interface (``acquire_read`` /
``acquire_write`` returning a hold with ``release()``). Threads are coordinated with events,
never with sleeps that must be long enough; the one timing assumption is that a thread blocked
for 0.3 s on a lock is really blocked.
"""

from __future__ import annotations

import threading
import time
from typing import List

import pytest

from concurrent_kv import LockTimeoutError
from concurrent_kv.locks import LOCK_KINDS, ReaderWriterLock, make_lock

SHARED_READS = [k for k in LOCK_KINDS if k != "mutex"]


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("kind", SHARED_READS)
def test_readers_hold_together_and_a_writer_waits_for_them(kind: str) -> None:
    lock = make_lock(kind)
    first, second = lock.acquire_read(1.0), lock.acquire_read(1.0)
    with pytest.raises(LockTimeoutError, match="write"):
        lock.acquire_write(0.05)
    first.release()
    with pytest.raises(LockTimeoutError):
        lock.acquire_write(0.05)  # one reader is still in
    second.release()
    lock.acquire_write(0.05).release()


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_a_writer_excludes_readers_and_writers(kind: str) -> None:
    lock = make_lock(kind)
    held = lock.acquire_write(1.0)
    with pytest.raises(LockTimeoutError):
        lock.acquire_read(0.05)
    with pytest.raises(LockTimeoutError):
        lock.acquire_write(0.05)
    held.release()
    lock.acquire_read(0.05).release()  # the timeouts left nothing behind
    lock.acquire_write(0.05).release()


@pytest.mark.parametrize("kind", SHARED_READS)
def test_a_waiting_writer_goes_before_readers_that_came_after_it(kind: str) -> None:
    """Fairness: a stream of readers cannot starve a writer."""
    lock = make_lock(kind)
    reader = lock.acquire_read(1.0)
    order: List[str] = []
    writer_waiting = threading.Event()

    def writer() -> None:
        writer_waiting.set()
        hold = lock.acquire_write(5.0)
        order.append("writer")
        hold.release()

    def late_reader() -> None:
        hold = lock.acquire_read(5.0)
        order.append("late reader")
        hold.release()

    w = in_thread(writer)
    writer_waiting.wait(1.0)
    w.join(0.3)  # the writer is queued behind the first reader
    assert w.is_alive() and order == []
    with pytest.raises(LockTimeoutError):
        lock.acquire_read(0.05)  # a new reader waits behind the queued writer
    r = in_thread(late_reader)
    r.join(0.3)
    assert r.is_alive() and order == []
    reader.release()
    w.join(5.0)
    r.join(5.0)
    assert order == ["writer", "late reader"]
    lock.acquire_write(0.05).release()


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_many_threads_never_see_a_half_done_write(kind: str) -> None:
    """Writers change two fields in two steps, yielding between; readers must see them equal."""
    lock = make_lock(kind)
    state = {"a": 0, "b": 0}
    torn: List[int] = []
    writers_in = [0]
    overlapping: List[int] = []
    start = threading.Barrier(6)

    def write(n: int) -> None:
        start.wait()
        for i in range(400):
            hold = lock.acquire_write(10.0)
            writers_in[0] += 1
            if writers_in[0] != 1:
                overlapping.append(writers_in[0])
            state["a"] = n * 1000 + i
            time.sleep(0)  # let another thread run mid-write
            state["b"] = n * 1000 + i
            writers_in[0] -= 1
            hold.release()

    def read() -> None:
        start.wait()
        for _ in range(800):
            hold = lock.acquire_read(10.0)
            a = state["a"]
            time.sleep(0)
            if state["b"] != a or writers_in[0]:
                torn.append(a)
            hold.release()

    threads = [in_thread(lambda n=n: write(n)) for n in range(2)] + [in_thread(read) for _ in range(4)]
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert torn == [] and overlapping == []
    assert state["a"] == state["b"] and state["a"] % 1000 == 399


def test_a_read_lock_released_twice_is_an_error_and_changes_nothing() -> None:
    lock = ReaderWriterLock("pool")
    hold = lock.acquire_read(1.0)
    other = lock.acquire_read(1.0)
    hold.release()
    other.release()
    with pytest.raises(RuntimeError, match="released more often"):
        hold.release()
    lock.acquire_write(0.05).release()  # still free, still usable
    lock.acquire_read(0.05).release()
