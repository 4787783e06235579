"""UniZero-shaped collectors: the workload the demo, the stress tests and the benchmarks drive.

A collector owns some environments and, per env step, does what UniZero's MCTS does to the cache
(``lightzero-unizero-kv-cache.md`` §3, §8):

1. root phase: read each env's previous root from its init pool, write the new root;
2. per simulation, phased as in one batched call: for every env a hierarchical get of a node
   already in the tree (root entries are hot), then for every env a recur write of the child;
3. a recur clear per search; an init-pool clear at each episode end.

Every stored entry encodes its key (:func:`fill_entry`), so every read is verified
(:func:`verify_entry`): a torn, stale or aliased entry cannot pass unnoticed.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
import xxhash

from .entry import EntrySpec, KeysValues
from .errors import ConfigError
from .manager import KVCacheManager

__all__ = [
    "WorkloadConfig",
    "CollectorResult",
    "WorkloadResult",
    "fill_entry",
    "verify_entry",
    "entry_key",
    "make_manager",
    "run_collector",
    "run_collectors",
]

# A prime below 2**23: values up to it are exact in float32.
_VALUE_MOD = 8_388_593


@dataclass(frozen=True)
class WorkloadConfig:
    """Shape and length of the workload. Defaults: Atari UniZero (96 KiB entries, 25 sims)."""

    env_num: int = 8
    collectors: int = 4
    num_simulations: int = 25
    steps: int = 20
    episode_length: int = 50
    num_layers: int = 2
    num_heads: int = 8
    context_length: int = 8
    head_dim: int = 96
    recur_clear: str = "auto"  # "global" (LightZero), "own" (delete own search's keys), "none", "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("env_num", "collectors", "num_simulations", "steps", "episode_length",
                     "num_layers", "num_heads", "context_length", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"WorkloadConfig.{name} must be a positive int, got {value!r}")
        if self.collectors > self.env_num:
            raise ConfigError(f"collectors ({self.collectors}) cannot exceed env_num ({self.env_num})")
        if self.recur_clear not in ("auto", "global", "own", "none"):
            raise ConfigError(f"recur_clear must be auto, global, own or none, got {self.recur_clear!r}")

    @property
    def spec(self) -> EntrySpec:
        return EntrySpec(self.num_layers, 1, self.num_heads, self.context_length, self.head_dim)

    def clear_mode(self) -> str:
        if self.recur_clear != "auto":
            return self.recur_clear
        # One collector clears the shared recur pool per search exactly as UniZero does; several
        # collectors sharing it would wipe each other's live trees, so each deletes its own keys.
        return "global" if self.collectors == 1 else "own"


def entry_key(seed: int, *parts: int) -> int:
    """A deterministic 64-bit key, standing in for ``hash_state`` of a latent."""
    return xxhash.xxh64(repr((seed, *parts)).encode()).intdigest()


def _expected(key: int, max_tokens: int, count: int) -> tuple:
    value = float(key % _VALUE_MOD)
    sizes = tuple((key >> (8 + 3 * i)) % (max_tokens + 1) for i in range(count))
    return value, sizes


def fill_entry(entry: KeysValues, key: int) -> KeysValues:
    """Make ``entry`` encode ``key``: every element and every ``_size`` derive from it."""
    caches = [c for layer in entry._keys_values for c in (layer._k_cache, layer._v_cache)]
    value, sizes = _expected(key, caches[0]._max_tokens, len(caches))
    entry._block.fill_(value)
    for cache, size in zip(caches, sizes):
        cache._size = size
    return entry


def verify_entry(entry: Any, key: int) -> bool:
    """Whether ``entry`` is exactly what :func:`fill_entry` wrote for ``key``."""
    caches = [c for layer in entry._keys_values for c in (layer._k_cache, layer._v_cache)]
    value, sizes = _expected(key, caches[0]._max_tokens, len(caches))
    if tuple(c._size for c in caches) != sizes:
        return False
    block = entry.block_if_intact() if isinstance(entry, KeysValues) else None
    if block is not None:  # one comparison over the whole entry
        return bool((block == value).all())
    return all(bool((c._cache == value).all()) for c in caches)


@dataclass
class CollectorResult:
    """Counters of one collector."""

    reads: int = 0
    hits: int = 0
    verified: int = 0
    corrupt: int = 0
    writes: int = 0
    deletes: int = 0
    clears: int = 0
    steps: int = 0
    errors: List[str] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return self.reads + self.writes + self.deletes + self.clears

    def add(self, other: "CollectorResult") -> None:
        for name in ("reads", "hits", "verified", "corrupt", "writes", "deletes", "clears", "steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)


@dataclass
class WorkloadResult:
    """The sum over collectors, and the wall time."""

    total: CollectorResult
    elapsed_s: float
    per_collector: List[CollectorResult]

    @property
    def ops_per_s(self) -> float:
        return self.total.ops / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def all_hits_verified(self) -> bool:
        return self.total.verified == self.total.hits and self.total.corrupt == 0 and not self.total.errors


def run_collector(
    manager: KVCacheManager,
    cfg: WorkloadConfig,
    env_ids: Sequence[int],
    collector_id: int,
    on_step: Optional[Callable[[], None]] = None,
) -> CollectorResult:
    """Run ``cfg.steps`` env steps for the envs ``env_ids`` (one batched search per step)."""
    res = CollectorResult()
    rng = random.Random(entry_key(cfg.seed, collector_id))
    scratch = cfg.spec.empty_entry()  # the world model's staging entry, reused for every write
    out = cfg.spec.empty_entry()  # read buffer: steady-state reads allocate nothing
    clear_mode = cfg.clear_mode()
    prev_root = {e: None for e in env_ids}

    def read(env_id: int, key: int, hierarchical: bool) -> None:
        res.reads += 1
        got = manager.hierarchical_get(env_id, key, out=out) if hierarchical else manager.get_init_cache(env_id, key, out=out)
        if got is not None:
            res.hits += 1
            if verify_entry(got, key):
                res.verified += 1
            else:
                res.corrupt += 1

    for step in range(cfg.steps):
        roots = {}
        for e in env_ids:  # root phase: reads, then writes
            if prev_root[e] is not None:
                read(e, prev_root[e], hierarchical=False)
        for e in env_ids:
            roots[e] = entry_key(cfg.seed, e, step, -1)
            manager.set_init_cache(e, roots[e], fill_entry(scratch, roots[e]))
            res.writes += 1
        trees = {e: [roots[e]] for e in env_ids}
        for sim in range(cfg.num_simulations):
            parents = {}
            for e in env_ids:  # all reads of one batched recurrent call...
                nodes = trees[e]
                parents[e] = nodes[0] if rng.random() < 0.5 else rng.choice(nodes)
                read(e, parents[e], hierarchical=True)
            for e in env_ids:  # ...then all its writes
                child = entry_key(cfg.seed, e, step, sim)
                manager.set_recur_cache(child, fill_entry(scratch, child))
                res.writes += 1
                trees[e].append(child)
        if clear_mode == "global":
            manager.clear_recur_cache()
            res.clears += 1
        elif clear_mode == "own":
            for e in env_ids:
                for key in trees[e][1:]:
                    manager.recur_pool.delete(key)
                    res.deletes += 1
        for e in env_ids:
            if (step + 1) % cfg.episode_length == 0:
                manager.clear_init_caches(e)
                res.clears += 1
                prev_root[e] = None
            else:
                prev_root[e] = roots[e]
        res.steps += len(env_ids)
        if on_step is not None:
            on_step()
    return res


def make_manager(cfg: WorkloadConfig, **config: Any) -> KVCacheManager:
    """A manager sized for ``cfg`` by LightZero's rules (``config`` overrides fields)."""
    return KVCacheManager({"num_simulations": cfg.num_simulations, **config}, cfg.env_num)


def run_collectors(
    manager: KVCacheManager,
    cfg: WorkloadConfig,
    on_step: Optional[Callable[[], None]] = None,
    timeout_s: float = 600.0,
) -> WorkloadResult:
    """Run ``cfg.collectors`` collector threads over ``cfg.env_num`` envs sharing ``manager``."""
    groups = [list(range(c, cfg.env_num, cfg.collectors)) for c in range(cfg.collectors)]
    results: List[Optional[CollectorResult]] = [None] * cfg.collectors
    lock = threading.Lock()

    def tick() -> None:
        if on_step is not None:
            with lock:
                on_step()

    def body(i: int) -> None:
        try:
            results[i] = run_collector(manager, cfg, groups[i], i, tick)
        except BaseException as exc:  # reported, never swallowed: the caller checks errors
            r = CollectorResult()
            r.errors.append(f"collector {i}: {type(exc).__name__}: {exc}")
            results[i] = r

    torch.set_num_threads(1)  # tensor copies are small; threads are the parallelism here
    threads = [threading.Thread(target=body, args=(i,), name=f"collector-{i}") for i in range(cfg.collectors)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    elapsed = time.perf_counter() - start
    total = CollectorResult()
    per: List[CollectorResult] = []
    for i, (t, r) in enumerate(zip(threads, results)):
        if t.is_alive():
            r = CollectorResult(errors=[f"collector {i}: still running after {timeout_s} s"])
        assert r is not None
        per.append(r)
        total.add(r)
    return WorkloadResult(total, elapsed, per)
