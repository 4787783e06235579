"""Pool locks behind one small interface.

A pool asks its lock for ``acquire_read(timeout)`` / ``acquire_write(timeout)`` and gets back an
object whose ``release()`` ends the hold. Two implementations:

* :class:`ReaderWriterLock` (default): ``readerwriterlock.RWLockFair``. Readers copy entries out
  in parallel (torch copies release the GIL); a writer excludes everyone. A **fresh** reader or
  writer object is generated per acquisition: ``readerwriterlock`` keeps the "locked" flag on the
  generated object, so one object shared by threads corrupts the lock (basilisp#722).
* :class:`MutexLock`: one ``threading.Lock`` for both sides; the cheapest when copies are small.

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

__all__ = ["PoolLock", "Releasable", "ReaderWriterLock", "MutexLock", "ProcessLock", "make_lock"]


class Releasable(Protocol):
    def release(self) -> None: ...


class PoolLock(Protocol):
    """What a pool needs from its lock."""

    def acquire_read(self, timeout: float) -> Releasable: ...

    def acquire_write(self, timeout: float) -> Releasable: ...


class ReaderWriterLock:
    """Shared readers, exclusive writer (``RWLockFair``: neither side starves)."""

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


_LOCKS: Dict[str, Callable[[str], PoolLock]] = {"rw": ReaderWriterLock, "mutex": MutexLock}


def make_lock(kind: Union[str, Callable[[str], PoolLock]], name: str = "pool") -> PoolLock:
    """Build a pool lock: ``"rw"`` (default), ``"mutex"``, or a factory ``f(name) -> PoolLock``."""
    if isinstance(kind, str):
        factory = _LOCKS.get(kind.lower())
        if factory is None:
            raise ConfigError(f"unknown lock kind {kind!r}; expected one of {sorted(_LOCKS)} or a factory")
        return factory(name)
    if callable(kind):
        return kind(name)
    raise ConfigError(f"lock must be 'rw', 'mutex' or a factory, got {type(kind).__name__}")


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
        self._shared_reads = kind == "rw"
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
        """In a forked child: a fresh descriptor (the inherited one shares the parent's lock)."""
        os.close(self._fd)  # closing our copy never releases the parent's lock; unlocking would
        self._fd = os.open(self._path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        self._threads = make_lock(self._kind, self._name)
        self._count_lock = threading.Lock()
        self._readers = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
