"""concurrent_kv: a thread-safe cache of transformer key/value tensors for RL world models.

A drop-in successor to the KV caches of LightZero's UniZero: per-environment init pools, a
shared recur pool and a wm pool behind one :class:`KVCacheManager`, each pool with its own
reader-writer lock, preallocated slot storage and FIFO / LRU / PRIORITY eviction. With
``shared=True`` the pools live in shared memory and worker processes attach by handle.
"""

from .collector import CollectorCaches
from .config import ManagerConfig
from .entry import Cache, EntrySpec, KeysValues, KVCache
from .errors import (
    ClosedError,
    ConcurrentKVError,
    ConfigError,
    EntryMismatchError,
    EnvIdError,
    InvalidEntryError,
    InvalidKeyError,
    InvalidPriorityError,
    InvariantError,
    HolderError,
    LockTimeoutError,
    PoolExhaustedError,
)
from .eviction import EvictionPolicy, EvictionStrategy, FIFOPolicy, LRUPolicy, PriorityPolicy, register_policy
from .keys import hash_state
from .manager import KVCacheManager, ManagerHandle
from .pool import KVCachePool, Lease, Occupancy, PoolHandle
from .shm import AttachError, SharedMemoryError
from .stats import CacheStats, StatsSnapshot

__version__ = "0.1.0"

__all__ = [
    "KVCacheManager",
    "CollectorCaches",
    "KVCachePool",
    "Lease",
    "Occupancy",
    "PoolHandle",
    "ManagerHandle",
    "AttachError",
    "SharedMemoryError",
    "ManagerConfig",
    "KeysValues",
    "KVCache",
    "Cache",
    "EntrySpec",
    "EvictionStrategy",
    "EvictionPolicy",
    "FIFOPolicy",
    "LRUPolicy",
    "PriorityPolicy",
    "register_policy",
    "CacheStats",
    "StatsSnapshot",
    "hash_state",
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
