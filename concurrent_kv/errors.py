"""Exception hierarchy of concurrent_kv.

Every error the library raises on purpose derives from :class:`ConcurrentKVError`. Each also
derives from the built-in exception a caller would naturally catch (``TypeError`` for a value of
the wrong type, ``ValueError`` for a bad value, ...), so existing ``except ValueError`` code keeps
working. A call that raises one of these has changed nothing already stored.
"""

from __future__ import annotations

__all__ = [
    "ConcurrentKVError",
    "ConfigError",
    "InvalidKeyError",
    "EnvIdError",
    "InvalidEntryError",
    "EntryMismatchError",
    "InvalidPriorityError",
    "PoolExhaustedError",
    "LockTimeoutError",
    "ClosedError",
    "InvariantError",
    "HolderError",
]


class ConcurrentKVError(Exception):
    """Base class of every error raised by concurrent_kv."""


class ConfigError(ConcurrentKVError, ValueError):
    """A constructor or configuration value is missing, of the wrong type or out of range."""


class InvalidKeyError(ConcurrentKVError, TypeError):
    """A cache key is not an int in [0, 2**64) (the range of an xxh64 digest)."""


class EnvIdError(ConcurrentKVError, IndexError, ValueError):
    """An environment id is not an int in [0, env_num).

    Also a ``ValueError``: LightZero's main-branch ``KVCacheManager`` raises that for a bad
    env id, so code written against it keeps catching ours."""


class InvalidEntryError(ConcurrentKVError, TypeError):
    """An object passed as a cache entry does not look like a ``KeysValues``."""


class EntryMismatchError(ConcurrentKVError, ValueError):
    """An entry's shape, dtype, device or token count does not fit the pool's slots."""


class InvalidPriorityError(ConcurrentKVError, ValueError):
    """A priority is not a finite real number."""


class PoolExhaustedError(ConcurrentKVError, RuntimeError):
    """Every slot of a pool is pinned by a lease, so nothing can be evicted for a new entry."""


class LockTimeoutError(ConcurrentKVError, TimeoutError):
    """A pool lock could not be acquired within the configured timeout."""


class ClosedError(ConcurrentKVError, RuntimeError):
    """An operation was attempted on a pool or manager after ``close()``."""


class HolderError(ConcurrentKVError, ValueError):
    """A holder id that this pool did not hand out to this process, or that was removed."""


class InvariantError(ConcurrentKVError, AssertionError):
    """``check()`` found the pool's bookkeeping inconsistent (a bug in concurrent_kv)."""
