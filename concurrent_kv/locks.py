"""Pool locks behind one small interface.

A pool asks its lock for ``acquire_read(timeout)`` / ``acquire_write(timeout)`` and gets back an
object whose ``release()`` ends the hold. Three implementations:

* :class:`ReaderWriterLock` (default, ``"rw"``): ``readerwriterlock.RWLockFair``'s protocol (a
  turnstile that a waiting writer holds, so neither side starves) on three ``threading.Lock`` objects,
  with a try-first fast path: an uncontended hold costs ~0.6 us where the library's generic code,
  which reads the clock around every inner lock, costs ~2.4 us, most of a 96 KiB get's budget.
* :class:`LibraryRWLock` (``"readerwriterlock"``): the library's ``RWLockFair`` itself. A
  **fresh** reader or writer object is generated per acquisition: ``readerwriterlock`` keeps the
  "locked" flag on the generated object, so one object shared by threads corrupts the lock
  (basilisp#722).
* :class:`MutexLock` (``"mutex"``): one ``threading.Lock`` for both sides; the cheapest when
  copies are small.

Shared pools put :class:`ProcessLock` on top: one of the above for threads, then ``flock`` for
processes, which the kernel releases when a holder dies.

None is re-entrant: pool code never calls a public locking method while holding its lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from typing import Callable, Dict, Protocol, Union

from readerwriterlock import rwlock

from .errors import ConfigError, LockTimeoutError

__all__ = [
    "PoolLock", "Releasable", "ReaderWriterLock", "LibraryRWLock", "MutexLock", "ProcessLock", "LOCK_KINDS", "make_lock",
]


class Releasable(Protocol):
    def release(self) -> None: ...


class PoolLock(Protocol):
    """What a pool needs from its lock."""

    def acquire_read(self, timeout: float) -> Releasable: ...

    def acquire_write(self, timeout: float) -> Releasable: ...


def _wait(lock: threading.Lock, deadline: float) -> bool:
    """The slow path: block on ``lock`` until ``deadline`` (``time.monotonic``)."""
    return lock.acquire(True, max(0.0, deadline - time.monotonic()))


class _Release:
    """A hold's ``release``: one per lock and side, so an acquisition allocates nothing."""

    __slots__ = ("release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release


class ReaderWriterLock:
    """Shared readers, exclusive writer, neither starving (``RWLockFair``'s protocol).

    A writer takes the turnstile and keeps it until it releases, so readers that arrive after it
    wait behind it; readers pass through the turnstile, and the first one in takes the room for
    all of them, the last one out gives it back. Each inner lock is first tried without blocking;
    only a contended one reads the clock and waits for what is left of ``timeout``.
    """

    def __init__(self, name: str = "pool") -> None:
        self._name = name
        self._turnstile = threading.Lock()
        self._room = threading.Lock()  # held by the writer, or by the readers as a group
        self._count_lock = threading.Lock()
        self._readers = 0
        self._read_hold = _Release(self._release_read)
        self._write_hold = _Release(self._release_write)

    def acquire_read(self, timeout: float) -> Releasable:
        # The deadline is set at the first wait: an uncontended acquisition reads no clock.
        deadline = 0.0
        turnstile, count_lock = self._turnstile, self._count_lock
        if not turnstile.acquire(False):
            deadline = time.monotonic() + timeout
            if not _wait(turnstile, deadline):
                raise LockTimeoutError(f"{self._name}: no read lock within {timeout} s")
        try:
            if not count_lock.acquire(False):
                deadline = deadline or time.monotonic() + timeout
                if not _wait(count_lock, deadline):
                    raise LockTimeoutError(f"{self._name}: no read lock within {timeout} s")
            try:
                if self._readers == 0 and not self._room.acquire(False):
                    deadline = deadline or time.monotonic() + timeout
                    if not _wait(self._room, deadline):
                        raise LockTimeoutError(f"{self._name}: no read lock within {timeout} s")
                self._readers += 1
            finally:
                count_lock.release()
        finally:
            turnstile.release()
        return self._read_hold

    def _release_read(self) -> None:
        with self._count_lock:
            if self._readers <= 0:
                raise RuntimeError(f"{self._name}: read lock released more often than acquired")
            self._readers -= 1
            if self._readers == 0:
                self._room.release()

    def acquire_write(self, timeout: float) -> Releasable:
        deadline = 0.0  # set at the first wait, as in acquire_read
        turnstile, room = self._turnstile, self._room
        if not turnstile.acquire(False):
            deadline = time.monotonic() + timeout
            if not _wait(turnstile, deadline):
                raise LockTimeoutError(f"{self._name}: no write lock within {timeout} s")
        if not room.acquire(False):
            deadline = deadline or time.monotonic() + timeout
            if not _wait(room, deadline):
                turnstile.release()
                raise LockTimeoutError(f"{self._name}: no write lock within {timeout} s")
        return self._write_hold

    def _release_write(self) -> None:
        self._room.release()
        self._turnstile.release()


class LibraryRWLock:
    """``readerwriterlock.RWLockFair`` itself: the same protocol, the library's code."""

    def __init__(self, name: str = "pool") -> None:
        self._rw = rwlock.RWLockFair()
        self._name = name

    def acquire_read(self, timeout: float) -> Releasable:
        lock = self._rw.gen_rlock()
        if not lock.acquire(blocking=True, timeout=timeout):
            raise LockTimeoutError(f"{self._name}: no read lock within {timeout} s")
        return lock

    def acquire_write(self, timeout: float) -> Releasable:
        lock = self._rw.gen_wlock()
        if not lock.acquire(blocking=True, timeout=timeout):
            raise LockTimeoutError(f"{self._name}: no write lock within {timeout} s")
        return lock


class MutexLock:
    """One exclusive lock for readers and writers alike."""

    def __init__(self, name: str = "pool") -> None:
        self._lock = threading.Lock()
        self._name = name

    def acquire_read(self, timeout: float) -> Releasable:
        if not self._lock.acquire(True, timeout):
            raise LockTimeoutError(f"{self._name}: no lock within {timeout} s")
        return self._lock

    acquire_write = acquire_read


_LOCKS: Dict[str, Callable[[str], PoolLock]] = {
    "rw": ReaderWriterLock,
    "readerwriterlock": LibraryRWLock,
    "mutex": MutexLock,
}
LOCK_KINDS = tuple(_LOCKS)  # the names a pool, a config or a shared pool accepts


def make_lock(kind: Union[str, Callable[[str], PoolLock]], name: str = "pool") -> PoolLock:
    """Build a pool lock: a name from :data:`LOCK_KINDS` (``"rw"`` is the default) or a factory
    ``f(name) -> PoolLock``."""
    if isinstance(kind, str):
        factory = _LOCKS.get(kind.lower())
        if factory is None:
            raise ConfigError(f"unknown lock kind {kind!r}; expected one of {sorted(_LOCKS)} or a factory")
        return factory(name)
    if callable(kind):
        return kind(name)
    raise ConfigError(f"lock must be one of {LOCK_KINDS} or a factory, got {type(kind).__name__}")


def _flock(fd: int, op: int, deadline: float, name: str) -> None:
    """``flock`` with a deadline (flock itself has none).

    Holds last microseconds, so a waiter first yields the CPU and retries (a sleep would cost
    ~60 us of timer slack per try); only a long wait backs off to real sleeps.
    """
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    tries = 0
    pause = 50e-6
    while True:
        if tries < 200:
            os.sched_yield()
        else:
            now = time.monotonic()
            if now >= deadline:
                kind = "shared" if op == fcntl.LOCK_SH else "exclusive"
                raise LockTimeoutError(f"{name}: no {kind} process lock within the timeout") from None
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 1e-3)
        tries += 1
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue


class _ReadHold:
    __slots__ = ("_owner", "_inner")

    def __init__(self, owner: "ProcessLock", inner: Releasable) -> None:
        self._owner, self._inner = owner, inner

    def release(self) -> None:
        self._owner._release_read(self._inner)


class _WriteHold:
    __slots__ = ("_fd", "_inner")

    def __init__(self, fd: int, inner: Releasable) -> None:
        self._fd, self._inner = fd, inner

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._inner.release()


class ProcessLock:
    """A pool lock shared by processes, that a crash cannot wedge.

    Threads of this process first take the in-process lock (``kind``: reader-writer or mutex);
    then the process takes ``flock`` on **its own** descriptor of the pool's file: shared for
    readers, exclusive for writers. The kernel drops an ``flock`` when its holder dies, so a
    SIGKILLed worker never leaves the pool locked. Readers of one process share one ``LOCK_SH``,
    counted so that the last one out releases it (``flock`` on one descriptor is not counted).
    """

    def __init__(self, path: str, kind: str = "rw", name: str = "pool") -> None:
        self._path = path
        self._name = name
        self._kind = kind
        self._threads = make_lock(kind, name)
        self._shared_reads = kind != "mutex"
        self._fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        self._count_lock = threading.Lock()
        self._readers = 0

    def acquire_read(self, timeout: float) -> Releasable:
        if not self._shared_reads:
            return self.acquire_write(timeout)
        deadline = time.monotonic() + timeout
        inner = self._threads.acquire_read(timeout)
        try:
            with self._count_lock:
                if self._readers == 0:
                    _flock(self._fd, fcntl.LOCK_SH, deadline, self._name)
                self._readers += 1
        except BaseException:
            inner.release()
            raise
        return _ReadHold(self, inner)

    def _release_read(self, inner: Releasable) -> None:
        with self._count_lock:
            self._readers -= 1
            if self._readers == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        inner.release()

    def acquire_write(self, timeout: float) -> Releasable:
        deadline = time.monotonic() + timeout
        inner = self._threads.acquire_write(timeout)
        try:
            _flock(self._fd, fcntl.LOCK_EX, deadline, self._name)
        except BaseException:
            inner.release()
            raise
        return _WriteHold(self._fd, inner)

    def reopen_after_fork(self) -> None:
        """In a forked child: a fresh descriptor (the inherited one shares the parent's lock).

        Opened through ``/proc/self/fd``, which reaches the same file even once its name is gone
        (the owner died and its reaper removed the names, and a worker forks); by name otherwise."""
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(f"/proc/self/fd/{self._fd}", flags)
        except OSError:
            fd = os.open(self._path, flags)
        os.close(self._fd)  # closing our copy never releases the parent's lock; unlocking would
        self._fd = fd
        self._threads = make_lock(self._kind, self._name)
        self._count_lock = threading.Lock()
        self._readers = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
