"""``CollectorCaches``: one collector's view of a shared :class:`~concurrent_kv.KVCacheManager`.

Several collectors (threads, worker processes, torchrun ranks) share one manager's recur pool,
each as if it had the caches to itself:

* **its own roots**: its env ids ``0 .. env_num-1`` map to the manager's init pools
  ``first_env .. first_env+env_num-1``, which it claims exclusively, so no other collector's env
  with the same index touches them; they evict and clear as an unshared pool does;
* **holds**: what it stores in the recur and wm pools it *holds*; a held entry is never evicted,
  and its clears release only its own holds, so another collector's live search tree and roots
  survive them. An entry two collectors stored (the same key) is one copy, kept until its last
  holder lets go;
* **a miss, never a crash**: when every slot is leased or held, a store is refused (counted in
  ``rejected``) and returns -1; the next lookup of that key misses and the caller recomputes, as
  after an eviction.

Lookups see every live entry of the shared pools, whoever stored it; ``foreign_hits`` counts the
hits on entries this collector did not store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

from .batch import PinnedBatch, SizesLike, WriteBatch, check_keys
from .checks import positive_int
from .entry import EntrySpec
from .errors import ClosedError, ConfigError, EnvIdError, PoolExhaustedError
from .pool import KVCachePool

if TYPE_CHECKING:
    import torch

    from .manager import KVCacheManager

__all__ = ["CollectorCaches"]


class CollectorCaches:
    """The starting design's calls for one collector; see the module docstring."""

    def __init__(self, manager: "KVCacheManager", first_env: int = 0, env_num: Optional[int] = None, *,
                 envs: Optional[Sequence[int]] = None) -> None:
        """The collector's env ``i`` is the manager's env ``first_env + i`` (``env_num`` of them,
        by default the rest), or ``envs[i]`` when the manager's envs are given as a list."""
        if envs is None:
            if isinstance(first_env, bool) or not isinstance(first_env, int) or first_env < 0:
                raise ConfigError(f"first_env must be an int >= 0, got {first_env!r}")
            count = manager.env_num - first_env if env_num is None else positive_int("env_num", env_num)
            envs = range(first_env, first_env + max(count, 0))
        envs = list(envs)
        if not envs or len(set(envs)) != len(envs) or not all(
                isinstance(e, int) and not isinstance(e, bool) and 0 <= e < manager.env_num for e in envs):
            raise ConfigError(f"a collector's envs must be distinct ints in [0, {manager.env_num}), got {envs!r}")
        self.manager = manager
        self.envs = envs
        self.first_env = envs[0]
        self.env_num = len(envs)
        self.init_pools: List[KVCachePool] = [manager.init_pools[e] for e in envs]
        self.recur_pool = manager.recur_pool
        self.wm_pool = manager.wm_pool
        self._holder: Dict[str, int] = {}
        self._stored: Dict[str, Set[int]] = {}  # keys this collector stored since its clear
        self._lookups: Dict[str, List[int]] = {}  # pool name -> [hits, misses] of this collector
        self.foreign_hits = 0
        self.rejected = 0
        self._closed = False
        try:
            for pool in self.init_pools:
                self._holder[pool.name] = pool.add_holder(exclusive=True)
            for pool in (self.recur_pool, self.wm_pool):
                self._holder[pool.name] = pool.add_holder()
        except BaseException:
            self.close()
            raise
        for name in self._holder:
            self._stored[name] = set()
            self._lookups[name] = [0, 0]

    # -- routing -----------------------------------------------------------------------------

    def _init_pool(self, env_id: int) -> KVCachePool:
        self._check_open()
        if isinstance(env_id, bool) or not isinstance(env_id, int) or not 0 <= env_id < self.env_num:
            raise EnvIdError(f"env_id must be an int in [0, {self.env_num}), got {env_id!r}")
        return self.init_pools[env_id]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this collector's caches are closed")

    def _get(self, pool: KVCachePool, key: int, out: Optional[Any]) -> Optional[Any]:
        found = pool.get(key, out)
        self._lookups[pool.name][found is None] += 1
        if found is not None and key not in self._stored[pool.name]:
            self.foreign_hits += 1
        return found

    def _set(self, pool: KVCachePool, key: int, kv: Any, priority: Optional[float], hold: bool = True) -> int:
        try:
            slot = pool.set(key, kv, priority, holder=self._holder[pool.name] if hold else None)
        except PoolExhaustedError:
            self.rejected += 1
            return -1
        self._stored[pool.name].add(key)
        return slot

    # -- the starting design's calls -----------------------------------------------------------

    def get_init_cache(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """A private copy of this collector's root entry of env ``env_id``, or None."""
        return self._get(self._init_pool(env_id), cache_key, out)

    def set_init_cache(self, env_id: int, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        """Store a root entry of env ``env_id`` (the pool is this collector's alone, so it evicts
        as usual); its slot, or -1 if every slot is leased."""
        return self._set(self._init_pool(env_id), cache_key, kv_cache, priority, hold=False)

    def get_recur_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        self._check_open()
        return self._get(self.recur_pool, cache_key, out)

    def set_recur_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        """Store and hold a recur entry; its slot, or -1 if every slot is leased or held."""
        self._check_open()
        return self._set(self.recur_pool, cache_key, kv_cache, priority)

    def get_wm_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        self._check_open()
        return self._get(self.wm_pool, cache_key, out)

    def set_wm_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        self._check_open()
        return self._set(self.wm_pool, cache_key, kv_cache, priority)

    def hierarchical_get(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """This collector's root pool of env ``env_id`` first, then the shared recur pool."""
        found = self.get_init_cache(env_id, cache_key, out)
        return found if found is not None else self.get_recur_cache(cache_key, out)

    # -- batches: one lock acquisition per pool, one tensor operation per batch ---------------------

    def pin_init(self, env_id: int, cache_key: int) -> PinnedBatch:
        """Pin this collector's root entry of env ``env_id`` (a one-key batch; see
        :meth:`KVCachePool.lookup_many`)."""
        pool = self._init_pool(env_id)
        return self._count_foreign(pool, pool.lookup_many([cache_key]))

    def pin_roots(self, cache_keys: Sequence[int]) -> List[PinnedBatch]:
        """Pin the root entry of ``cache_keys[i]`` in env ``i``'s root pool, for every ``i``
        (UniZero's first lookup of each env of a batch): one one-key batch per env."""
        keys = check_keys(cache_keys)
        self._check_open()
        if len(keys) > self.env_num:
            raise EnvIdError(f"{len(keys)} keys for a collector of {self.env_num} envs")
        out = []
        for pool, key in zip(self.init_pools, keys):  # keys checked once above: straight to the pins
            pool._start_call()
            batch = pool._pin_many([key])
            out.append(self._count_foreign(pool, batch) if batch.hits else batch)
        return out

    def pin_recur_many(self, cache_keys: Sequence[int]) -> PinnedBatch:
        """Pin the recur entries of ``cache_keys``, whoever stored them, under one lock."""
        self._check_open()
        return self._count_foreign(self.recur_pool, self.recur_pool.lookup_many(cache_keys))

    def _count_foreign(self, pool: KVCachePool, batch: PinnedBatch) -> PinnedBatch:
        if batch.hits:
            stored = self._stored[pool.name]
            for key, slot in zip(batch.keys, batch.slots):
                if slot >= 0 and key not in stored:
                    self.foreign_hits += 1
        return batch

    def write_init(self, env_id: int, cache_key: int, size: SizesLike,
                   entry_spec: Optional[EntrySpec] = None) -> WriteBatch:
        """Reserve a slot for a root entry of env ``env_id`` (not held: the pool is this
        collector's own); write it, then :meth:`commit`. Refused (counted) if every slot is leased."""
        return self._reserve(self._init_pool(env_id), [cache_key], [size], entry_spec, hold=False)

    def write_recur_many(self, cache_keys: Sequence[int], sizes: Sequence[SizesLike],
                         entry_spec: Optional[EntrySpec] = None) -> WriteBatch:
        """Reserve held recur slots for a batch; the refused ones (every slot leased or held)
        are counted in ``rejected`` and will miss later, so the caller recomputes them."""
        self._check_open()
        return self._reserve(self.recur_pool, cache_keys, sizes, entry_spec, hold=True)

    def _reserve(self, pool: KVCachePool, keys: Sequence[int], sizes: Sequence[SizesLike],
                 entry_spec: Optional[EntrySpec], hold: bool) -> WriteBatch:
        holder = self._holder[pool.name] if hold else None
        batch = pool.write_many(keys, sizes, holder=holder, partial=True, entry_spec=entry_spec)
        self.rejected += batch.refused
        return batch

    def set_recur_many(self, cache_keys: Sequence[int], entries: Any, sizes: Optional[Sequence[SizesLike]] = None,
                       entry_spec: Optional[EntrySpec] = None) -> List[int]:
        """Store and hold a batch of recur entries with one copy (see
        :meth:`KVCachePool.set_many`); each key's slot, -1 where refused (counted in ``rejected``:
        every slot was leased or held; the key will miss and the caller recomputes it)."""
        self._check_open()
        pool = self.recur_pool
        slots = pool.set_many(cache_keys, entries, sizes, holder=self._holder[pool.name], partial=True,
                              entry_spec=entry_spec)
        return self._stored_recur(cache_keys, slots)

    def _store_recur_views(self, cache_keys: List[int], views: List[torch.Tensor], rows: List[Tuple[int, ...]],
                           spec: EntrySpec) -> List[int]:
        """:meth:`set_recur_many` without its per-entry checks, for the batched seam alone:
        ``views`` are token prefixes of its own scratch block, shaped from ``spec`` (which the
        pool still compares with its slots), ``rows`` their token counts per cache, at most the
        views' lengths; the keys are xxh64 digests (plain ints in range)."""
        self._check_open()
        pool = self.recur_pool
        pool._start_call()
        slots = pool._store_many(cache_keys, spec, views, rows, 0.0, self._holder[pool.name], True)
        return self._stored_recur(cache_keys, slots)

    def _stored_recur(self, keys: Sequence[int], slots: List[int]) -> List[int]:
        """Book a recur batch's stores: refusals counted, the stored keys remembered as ours."""
        refused = slots.count(-1)
        self.rejected += refused
        self._stored[self.recur_pool.name].update(keys if not refused else [k for k, s in zip(keys, slots) if s >= 0])
        return slots

    def commit(self, batch: WriteBatch) -> List[int]:
        """Publish a batch from :meth:`write_init` or :meth:`write_recur_many`; its slots."""
        slots = batch.commit()
        stored = self._stored[batch.pool.name]
        for key, slot in zip(batch.keys, slots):
            if slot >= 0:
                stored.add(key)
        return slots

    # -- clears release this collector's holds only ------------------------------------------------

    def _release(self, pool: KVCachePool) -> int:
        self._stored[pool.name].clear()
        return pool.release(self._holder[pool.name])

    def clear_init_caches(self, env_id: Optional[int] = None) -> None:
        """Empty one of this collector's root pools, or all of them."""
        self._check_open()
        pools = self.init_pools if env_id is None else [self._init_pool(env_id)]
        for pool in pools:
            self._stored[pool.name].clear()
            pool.clear()

    def clear_recur_cache(self) -> int:
        """Let go of this collector's recur entries (UniZero clears once per search); entries
        another collector also holds stay. Return how many entries were removed."""
        self._check_open()
        return self._release(self.recur_pool)

    def clear_wm_cache(self) -> int:
        self._check_open()
        return self._release(self.wm_pool)

    def clear_all(self) -> None:
        self.clear_init_caches()
        self.clear_recur_cache()
        self.clear_wm_cache()

    def close(self) -> None:
        """Release every hold and retire this collector's holder ids. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pool in [*self.init_pools, self.recur_pool, self.wm_pool]:
            holder = self._holder.pop(pool.name, None)
            if holder is not None and not pool.closed:
                pool.remove_holder(holder)

    def stats(self) -> Dict[str, Any]:
        """This collector's own counts: hits on entries it did not store, stores refused, and per
        pool its lookups' hits and misses (a shared pool's own counters sum every collector's)."""
        pools = {name: {"hits": h, "misses": m} for name, (h, m) in self._lookups.items()}
        return {"foreign_hits": self.foreign_hits, "rejected": self.rejected, "pools": pools}

    def stored_keys(self, pool: KVCachePool) -> frozenset:
        """The keys this collector stored in ``pool`` since it last cleared it (in the recur and
        wm pools: the entries it holds)."""
        self._check_open()
        if pool.name not in self._stored:
            raise ConfigError(f"pool {pool.name!r} is not one of this collector's")
        return frozenset(self._stored[pool.name])

    def __enter__(self) -> "CollectorCaches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CollectorCaches(envs {self.envs} of {self.manager.env_num}, "
                f"foreign_hits={self.foreign_hits}, rejected={self.rejected})")
