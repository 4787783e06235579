"""Pool locks behind one small interface.

A pool asks its lock for ``acquire_read(timeout)`` / ``acquire_write(timeout)`` and gets back an
object whose ``release()`` ends the hold. Two implementations:

* :class:`ReaderWriterLock` (default): ``readerwriterlock.RWLockFair``. Readers copy entries out
  in parallel (torch copies release the GIL); a writer excludes everyone. A **fresh** reader or
  writer object is generated per acquisition: ``readerwriterlock`` keeps the "locked" flag on the
  generated object, so one object shared by threads corrupts the lock (basilisp#722).
* :class:`MutexLock`: one ``threading.Lock`` for both sides; the cheapest when copies are small.

Neither is re-entrant: pool code never calls a public locking method while holding its lock.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Protocol, Union

from readerwriterlock import rwlock

from .errors import ConfigError, LockTimeoutError

__all__ = ["PoolLock", "Releasable", "ReaderWriterLock", "MutexLock", "make_lock"]


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
