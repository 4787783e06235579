"""``KVCacheManager``: UniZero's three cache systems as one object.

* ``init_pools[env_id]``: one pool per environment for root ("initial inference") entries;
* ``recur_pool``: one pool shared by every environment's MCTS simulations;
* ``wm_pool``: a small staging pool.

The manager only routes calls to pools and gathers statistics; how a pool stores or locks is
the pool's business. Each pool has its own lock, so environments never contend with each other
on their init pools.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import shared as shared_memory
from .checks import boolean, instance_of, non_negative_int, positive_int
from .collector import CollectorCaches
from .config import ManagerConfig
from .entry import EntrySpec
from .errors import ClosedError, ConfigError, EnvIdError
from .pool import MAX_SLOTS, KVCachePool, PoolHandle
from .shm import AttachError
from .stats import StatsSnapshot

__all__ = ["KVCacheManager", "ManagerHandle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagerHandle:
    """What a worker needs to attach to a shared manager: its config and its pools' handles."""

    config: ManagerConfig
    env_num: int
    enable_stats: bool
    pools: Tuple[PoolHandle, ...]


class KVCacheManager:
    """Per-env init pools, a shared recur pool and a wm pool, with the starting design's API.

    ``config`` is a dict, dataclass, attribute object (LightZero's world-model config) or
    :class:`~concurrent_kv.config.ManagerConfig`; see that class for the fields read.
    """

    def __init__(
        self,
        config: Any,
        env_num: int,
        enable_stats: bool = True,
        clear_recur_log_freq: int = 1000,
        clear_all_log_freq: int = 100,
        *,
        shared: bool = False,
        entry_spec: Optional[EntrySpec] = None,
    ) -> None:
        positive_int("env_num", env_num)
        boolean("enable_stats", enable_stats)
        non_negative_int("clear_recur_log_freq", clear_recur_log_freq)
        non_negative_int("clear_all_log_freq", clear_all_log_freq)
        boolean("shared", shared)
        if entry_spec is not None:
            instance_of("entry_spec", entry_spec, EntrySpec)
        cfg = ManagerConfig.from_any(config)
        spec = entry_spec if entry_spec is not None else cfg.entry_spec()
        if shared and spec is None:
            raise ConfigError(
                "a shared manager needs the entry shape: pass entry_spec=, or num_layers, num_heads, "
                "embed_dim and context_length in the config"
            )
        plan = self._pool_plan(cfg, env_num)
        for size, _, name in plan:  # before allocating anything
            if size > MAX_SLOTS:
                raise ConfigError(f"pool {name} would have {size:,} slots; a pool holds at most {MAX_SLOTS:,}")
        pools: List[KVCachePool] = []
        # One id in every pool's description: `concurrent-kv shm list` shows them as one manager.
        group = shared_memory.grouped(secrets.token_hex(8)) if shared else contextlib.nullcontext()
        try:
            with group:
                for size, strategy, name in plan:
                    pools.append(KVCachePool(
                        size, strategy, enable_stats, name, entry_spec=spec, lock=cfg.lock,
                        lock_timeout=cfg.lock_timeout, shared=shared, max_workers=cfg.max_workers,
                    ))
        except BaseException:
            for p in pools:  # never leave half a manager's segments behind
                p.close()
            raise
        self._assemble(cfg, env_num, enable_stats, shared, pools, clear_recur_log_freq, clear_all_log_freq)

    @staticmethod
    def _pool_plan(cfg: ManagerConfig, n: int) -> List[Tuple[int, Any, str]]:
        """(slots, eviction strategy, name) of every pool: init pools in env order, recur, wm."""
        plan = [(cfg.init_size(), cfg.init_eviction_strategy, f"init_env{e}") for e in range(n)]
        plan.append((cfg.recur_size(n), cfg.recur_eviction_strategy, "recurrent"))
        plan.append((cfg.wm_size(n), cfg.wm_eviction_strategy, "world_model"))
        return plan

    def _assemble(self, config: ManagerConfig, env_num: int, enable_stats: bool, shared: bool,
                  pools: List[KVCachePool], clear_recur_log_freq: int = 1000, clear_all_log_freq: int = 100) -> None:
        """The one assembly step of ``__init__`` and :meth:`attach`."""
        self.config = config
        self.env_num = env_num
        self.enable_stats = enable_stats
        self.shared = shared
        self._closed = False
        # Clears are logged once every ``*_log_freq`` calls (0: never), as LightZero's main branch does.
        self.clear_recur_log_freq = clear_recur_log_freq
        self.clear_all_log_freq = clear_all_log_freq
        self._clear_recur_counter = 0
        self._clear_all_counter = 0
        self._count_lock = threading.Lock()
        self.init_pools: List[KVCachePool] = pools[: self.env_num]
        self.recur_pool = pools[self.env_num]
        self.wm_pool = pools[self.env_num + 1]
        # Per-call scratch lists that LightZero's world model keeps on its manager.
        self.keys_values_wm_list: List[Any] = []
        self.keys_values_wm_size_list: List[int] = []

    # -- sharing with worker processes ---------------------------------------------------

    def handle(self) -> "ManagerHandle":
        """A small picklable handle: give it to a worker, which calls :meth:`attach`."""
        if self._closed:
            raise ClosedError("KVCacheManager is closed")
        if not self.shared:
            raise ConfigError("this manager is not shared: create it with shared=True to hand it to workers")
        return ManagerHandle(self.config, self.env_num, self.enable_stats, tuple(p.handle() for p in self.pools()))

    @classmethod
    def attach(cls, handle: "ManagerHandle") -> "KVCacheManager":
        """The shared manager behind ``handle``, with the same API, in this process."""
        if not isinstance(handle, ManagerHandle):
            raise AttachError(f"attach expects a ManagerHandle, got {type(handle).__name__}")
        pools: List[KVCachePool] = []
        try:
            for h in handle.pools:
                pools.append(KVCachePool.attach(h))
        except BaseException:
            for p in pools:
                p.close()
            raise
        manager = cls.__new__(cls)
        manager._assemble(handle.config, handle.env_num, handle.enable_stats, True, pools)
        return manager

    # -- routing -------------------------------------------------------------------------

    def _init_pool(self, env_id: int) -> KVCachePool:
        if self._closed:
            raise ClosedError("KVCacheManager is closed")
        if isinstance(env_id, bool) or not isinstance(env_id, int) or not 0 <= env_id < self.env_num:
            raise EnvIdError(f"env_id must be an int in [0, {self.env_num}), got {env_id!r}")
        return self.init_pools[env_id]

    def get_init_cache(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """A private copy of env ``env_id``'s root entry under ``cache_key``, or None.

        Every getter takes ``out=``: copy into that entry instead of allocating (see
        :meth:`KVCachePool.get`)."""
        return self._init_pool(env_id).get(cache_key, out)

    def set_init_cache(self, env_id: int, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        """Deep-copy a root entry into env ``env_id``'s init pool; return its slot.

        Every setter takes ``priority=`` for pools configured with PRIORITY eviction."""
        return self._init_pool(env_id).set(cache_key, kv_cache, priority)

    def get_recur_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """A private copy of the recur-pool entry under ``cache_key``, or None."""
        return self.recur_pool.get(cache_key, out)

    def set_recur_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        """Deep-copy an entry into the shared recur pool; return its slot."""
        return self.recur_pool.set(cache_key, kv_cache, priority)

    def get_wm_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """A private copy of the wm-pool entry under ``cache_key``, or None."""
        return self.wm_pool.get(cache_key, out)

    def set_wm_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        """Deep-copy an entry into the wm staging pool; return its slot."""
        return self.wm_pool.set(cache_key, kv_cache, priority)

    def hierarchical_get(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        """Env ``env_id``'s init pool first, then the recur pool (UniZero's lookup order)."""
        found = self._init_pool(env_id).get(cache_key, out)
        return found if found is not None else self.recur_pool.get(cache_key, out)

    def collector(self, first_env: int = 0, env_num: Optional[int] = None, *,
                  envs: Optional[Sequence[int]] = None) -> CollectorCaches:
        """One collector's view of this manager (see :class:`~concurrent_kv.collector.CollectorCaches`):
        its own root pools (envs ``first_env .. first_env+env_num-1``, or the list ``envs``,
        claimed exclusively), holds on what it stores in the shared recur and wm pools, clears
        that release only its holds. ``env_num`` defaults to the rest of the manager's envs."""
        if self._closed:
            raise ClosedError("KVCacheManager is closed")
        return CollectorCaches(self, first_env, env_num, envs=envs)

    # -- clearing ------------------------------------------------------------------------

    def clear_all(self) -> None:
        """Empty every pool (storage is kept for reuse) and the scratch lists."""
        for p in self.pools():
            p.clear()
        self.keys_values_wm_list.clear()
        self.keys_values_wm_size_list.clear()
        self._log_clear("all", "Cleared all KV caches")

    def clear_init_caches(self, env_id: Optional[int] = None) -> None:
        """Empty one env's init pool, or all of them when ``env_id`` is None."""
        if env_id is None:
            for p in self.init_pools:
                p.clear()
        else:
            self._init_pool(env_id).clear()

    def clear_recur_cache(self) -> None:
        """Empty the recur pool (UniZero does this once per MCTS search)."""
        self.recur_pool.clear()
        self._log_clear("recur", "Cleared recurrent inference cache")

    def _log_clear(self, which: str, what: str) -> None:
        """Count a clear; log every ``clear_<which>_log_freq``-th one (0: never)."""
        with self._count_lock:
            count = getattr(self, f"_clear_{which}_counter") + 1
            setattr(self, f"_clear_{which}_counter", count)
        freq = getattr(self, f"clear_{which}_log_freq")
        if freq > 0 and count % freq == 0:
            log.info("%s (this message appears every %d calls, total calls: %d)", what, freq, count)

    # -- statistics ----------------------------------------------------------------------

    def pools(self) -> List[KVCachePool]:
        """Every pool: init pools in env order, then recur, then wm."""
        return [*self.init_pools, self.recur_pool, self.wm_pool]

    def get_stats_summary(self, as_strings: bool = False) -> Dict[str, Any]:
        """Per-pool counters and rates.

        ``{'stats_enabled': True, 'init_pools': {'env_0': {...}, ...}, 'recur_pool': {...},
        'wm_pool': {...}, 'total': {...}}`` with each ``{...}`` a flat dict of counters and rates.
        ``as_strings=True`` gives the starting design's form, each pool as ``'CacheStats(...)'``.
        """
        if not self.enable_stats:
            return {"stats_enabled": False}
        render = str if as_strings else StatsSnapshot.as_dict
        snaps = {p.name: p.stats_snapshot() for p in self.pools()}
        summary: Dict[str, Any] = {
            "stats_enabled": True,
            "init_pools": {f"env_{e}": render(snaps[p.name]) for e, p in enumerate(self.init_pools)},
            "recur_pool": render(snaps[self.recur_pool.name]),
            "wm_pool": render(snaps[self.wm_pool.name]),
        }
        if not as_strings:
            total = StatsSnapshot()
            for s in snaps.values():
                total = total + s
            summary["total"] = total.as_dict()
        return summary

    def flat_stats(self, prefix: str = "kv_cache") -> Dict[str, float]:
        """``{'kv_cache/recurrent/hit_rate': ..., ...}`` for ``SummaryWriter.add_scalar``."""
        out: Dict[str, float] = {}
        for p in self.pools():
            for name, value in p.stats_snapshot().as_dict().items():
                out[f"{prefix}/{p.name}/{name}"] = value
        return out

    def reset_stats(self) -> None:
        """Zero every pool's counters."""
        for p in self.pools():
            p.reset_stats()

    # -- lifecycle -----------------------------------------------------------------------

    def check(self) -> None:
        """Run every pool's invariant check (see :meth:`KVCachePool.check`)."""
        for p in self.pools():
            p.check()

    def close(self) -> None:
        """Close every pool and release its storage. Idempotent."""
        self._closed = True
        for p in self.pools():
            p.close()

    def __enter__(self) -> "KVCacheManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = [len(p) for p in self.init_pools]
        return (
            f"KVCacheManager(env_num={self.env_num}, init_caches={sizes}, "
            f"recur_cache={len(self.recur_pool)}/{self.recur_pool.capacity}, "
            f"wm_cache={len(self.wm_pool)}/{self.wm_pool.capacity})"
        )
