"""UniZero-shaped collectors: the workload the demo, the stress tests and the benchmarks drive.

A collector owns some environments and, per env step, does what UniZero's MCTS does to the cache
(``lightzero-unizero-kv-cache.md`` §3, §8):

1. root phase: read each env's previous root from its init pool, write the new root;
2. per simulation, phased as in one batched call: for every env a hierarchical get of a node
   already in the tree (root entries are hot), then for every env a recur write of the child;
3. a recur clear per search; an init-pool clear at each episode end.

Every stored entry encodes its key (:func:`fill_entry`), so every read is verified
(:func:`verify_entry`): a torn, stale or aliased entry cannot pass unnoticed.

The collector talks to a :class:`CacheBackend`: :class:`KVCacheManager` is one, and
``concurrent_kv.testing.legacy_backend.LegacyRingBackend`` (a model of LightZero's own rings) is
another, so the benchmarks replay one loop, one operation sequence, on both.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

import torch
import xxhash

from .entry import EntrySpec, KeysValues
from .errors import ConfigError
from .manager import KVCacheManager

__all__ = [
    "CacheBackend",
    "WorkloadConfig",
    "CollectorResult",
    "WorkloadResult",
    "fill_entry",
    "verify_entry",
    "entry_writer",
    "entry_key",
    "make_manager",
    "run_collector",
    "run_collectors",
    "run_processes",
]

# A prime below 2**23: values up to it are exact in float32.
_VALUE_MOD = 8_388_593
#: How many states are common to every env when ``shared_keys`` > 0.
_COMMON_STATES = 16


class CacheBackend(Protocol):
    """The cache calls a collector makes: those of UniZero's MCTS, with the manager's signatures.

    Getters copy a hit into ``out`` and return it (the collector always passes ``out=``: its
    reads allocate nothing), or return None on a miss. ``recur_clear="own"`` also needs
    ``collector(envs=...)`` (see :meth:`KVCacheManager.collector`): collectors that share the
    recur pool then hold what they store and release only their own entries."""

    def get_init_cache(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]: ...

    def hierarchical_get(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]: ...

    def get_recur_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]: ...

    def set_init_cache(self, env_id: int, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int: ...

    def set_recur_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int: ...

    def clear_recur_cache(self) -> Optional[int]: ...  # a collector view says how many it removed

    def clear_init_caches(self, env_id: Optional[int] = None) -> None: ...


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
    recur_clear: str = "auto"  # "global" (LightZero), "own" (release own holds), "none", "auto"
    shared_keys: float = 0.0  # chance that a child is a state common to every env (a transposition)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("env_num", "collectors", "num_simulations", "steps", "episode_length",
                     "num_layers", "num_heads", "context_length", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"WorkloadConfig.{name} must be a positive int, got {value!r}")
        if self.collectors > self.env_num:
            raise ConfigError(f"collectors ({self.collectors}) cannot exceed env_num ({self.env_num})")
        if not (isinstance(self.shared_keys, (int, float)) and 0.0 <= self.shared_keys <= 1.0):
            raise ConfigError(f"WorkloadConfig.shared_keys must be in [0, 1], got {self.shared_keys!r}")
        if self.recur_clear not in ("auto", "global", "own", "none"):
            raise ConfigError(f"recur_clear must be auto, global, own or none, got {self.recur_clear!r}")

    @property
    def spec(self) -> EntrySpec:
        return EntrySpec(self.num_layers, 1, self.num_heads, self.context_length, self.head_dim)

    def clear_mode(self) -> str:
        if self.recur_clear != "auto":
            return self.recur_clear
        # One collector clears the shared recur pool per search exactly as UniZero does; several
        # collectors sharing it would wipe each other's live trees, so each releases its own holds.
        return "global" if self.collectors == 1 else "own"


def entry_key(seed: int, *parts: int) -> int:
    """A deterministic 64-bit key, standing in for ``hash_state`` of a latent."""
    return xxhash.xxh64(repr((seed, *parts)).encode()).intdigest()


def _expected(key: int, max_tokens: int, count: int) -> tuple:
    value = float(key % _VALUE_MOD)
    sizes = tuple((key >> (8 + 3 * i)) % (max_tokens + 1) for i in range(count))
    return value, sizes


def fill_entry(entry: KeysValues, key: int, writer: int = 0) -> KeysValues:
    """Make ``entry`` encode ``key``: every element but the last and every ``_size`` derive from
    it; the last element records ``writer`` (who wrote it: a process tag, for cross-process hits)."""
    caches = [c for layer in entry._keys_values for c in (layer._k_cache, layer._v_cache)]
    value, sizes = _expected(key, caches[0]._max_tokens, len(caches))
    entry._block.fill_(value)
    entry._block.view(-1)[-1] = float(writer)
    for cache, size in zip(caches, sizes):
        cache._size = size
    return entry


def _flat_parts(entry: Any) -> List[torch.Tensor]:
    block = entry.block_if_intact() if isinstance(entry, KeysValues) else None
    if block is not None:
        return [block.reshape(-1)]
    return [c._cache.reshape(-1) for layer in entry._keys_values for c in (layer._k_cache, layer._v_cache)]


def verify_entry(entry: Any, key: int) -> bool:
    """Whether ``entry`` is exactly what :func:`fill_entry` wrote for ``key`` (any writer)."""
    caches = [c for layer in entry._keys_values for c in (layer._k_cache, layer._v_cache)]
    value, sizes = _expected(key, caches[0]._max_tokens, len(caches))
    if tuple(c._size for c in caches) != sizes:
        return False
    parts = _flat_parts(entry)
    parts[-1] = parts[-1][:-1]  # the writer tag
    return all(bool((p == value).all()) for p in parts)


def entry_writer(entry: Any) -> int:
    """The writer tag :func:`fill_entry` stored in ``entry``."""
    return int(_flat_parts(entry)[-1][-1].item())


@dataclass
class CollectorResult:
    """Counters of one collector."""

    reads: int = 0
    hits: int = 0
    foreign_hits: int = 0  # hits on an entry another process wrote
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
        for name in ("reads", "hits", "foreign_hits", "verified", "corrupt", "writes", "deletes", "clears", "steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)


@dataclass
class WorkloadResult:
    """The sum over collectors, and the time they ran: from their common start to the last one
    done. ``startup_s`` is what came before, for worker processes: start and attach."""

    total: CollectorResult
    elapsed_s: float
    per_collector: List[CollectorResult]
    startup_s: float = 0.0

    @property
    def ops_per_s(self) -> float:
        return self.total.ops / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def all_hits_verified(self) -> bool:
        return self.total.verified == self.total.hits and self.total.corrupt == 0 and not self.total.errors


def run_collector(
    manager: CacheBackend,
    cfg: WorkloadConfig,
    env_ids: Sequence[int],
    collector_id: int,
    on_step: Optional[Callable[[], None]] = None,
    writer: int = 0,
) -> CollectorResult:
    """Run ``cfg.steps`` env steps for the envs ``env_ids`` (one batched search per step) on
    ``manager``, a :class:`KVCacheManager` or any other :class:`CacheBackend`.

    ``writer`` tags every entry this collector writes; a hit on another tag crossed processes."""
    clear_mode = cfg.clear_mode()
    if clear_mode != "own":
        return _run_collector(manager, manager, {e: e for e in env_ids}, cfg, collector_id, on_step, writer)
    make_view = getattr(manager, "collector", None)
    if make_view is None:
        raise ConfigError("recur_clear='own' needs a backend with collector(envs=...), such as a KVCacheManager")
    view = make_view(envs=list(env_ids))  # this collector's roots and holds
    try:
        return _run_collector(manager, view, {e: i for i, e in enumerate(env_ids)}, cfg, collector_id, on_step, writer)
    finally:
        view.close()


def _run_collector(manager: CacheBackend, caches: CacheBackend, envs: Dict[int, int], cfg: WorkloadConfig,
                   collector_id: int, on_step: Optional[Callable[[], None]], writer: int) -> CollectorResult:
    """The collector loop. ``caches`` takes this collector's calls, with env ``e`` as
    ``envs[e]``: the manager itself, or (``recur_clear="own"``) its collector view, whose
    clears release only this collector's entries. States common to every env go to ``manager``
    unheld, so they outlive the search."""
    res = CollectorResult()
    rng = random.Random(entry_key(cfg.seed, collector_id))
    scratch = cfg.spec.empty_entry()  # the world model's staging entry, reused for every write
    out = cfg.spec.empty_entry()  # read buffer: steady-state reads allocate nothing
    clear_mode = cfg.clear_mode()
    env_ids = list(envs)
    prev_root: Dict[int, Optional[int]] = {e: None for e in env_ids}

    def check(got: Any, key: int) -> None:
        res.hits += 1
        if verify_entry(got, key):
            res.verified += 1
            res.foreign_hits += entry_writer(got) != writer
        else:
            res.corrupt += 1

    def read(env_id: int, key: int, hierarchical: bool) -> None:
        res.reads += 1
        local = envs[env_id]
        got = caches.hierarchical_get(local, key, out=out) if hierarchical else caches.get_init_cache(local, key, out=out)
        if got is not None:
            check(got, key)

    for step in range(cfg.steps):
        roots: Dict[int, int] = {}
        for e in env_ids:  # root phase: reads, then writes
            previous = prev_root[e]
            if previous is not None:
                read(e, previous, hierarchical=False)
        for e in env_ids:
            roots[e] = entry_key(cfg.seed, e, step, -1)
            caches.set_init_cache(envs[e], roots[e], fill_entry(scratch, roots[e], writer))
            res.writes += 1
        trees = {e: [roots[e]] for e in env_ids}
        for sim in range(cfg.num_simulations):
            parents: Dict[int, int] = {}
            for e in env_ids:  # all reads of one batched recurrent call...
                nodes = trees[e]
                parents[e] = nodes[0] if rng.random() < 0.5 else rng.choice(nodes)
                read(e, parents[e], hierarchical=True)
            for e in env_ids:  # ...then all its writes
                if cfg.shared_keys and rng.random() < cfg.shared_keys:
                    # A state common to every env (a transposition): reuse it if anyone, in any
                    # process, cached it already; it outlives the search (FIFO evicts it).
                    child = entry_key(cfg.seed, -1, rng.randrange(_COMMON_STATES))
                    res.reads += 1
                    got = manager.get_recur_cache(child, out=out)
                    if got is not None:
                        check(got, child)
                        trees[e].append(child)
                        continue
                    manager.set_recur_cache(child, fill_entry(scratch, child, writer))
                else:
                    child = entry_key(cfg.seed, e, step, sim)
                    caches.set_recur_cache(child, fill_entry(scratch, child, writer))
                res.writes += 1
                trees[e].append(child)
        if clear_mode == "global":
            manager.clear_recur_cache()
            res.clears += 1
        elif clear_mode == "own":
            res.deletes += caches.clear_recur_cache() or 0  # this search's own entries only
        for e in env_ids:
            if (step + 1) % cfg.episode_length == 0:
                caches.clear_init_caches(envs[e])
                res.clears += 1
                prev_root[e] = None
            else:
                prev_root[e] = roots[e]
        res.steps += len(env_ids)
        if on_step is not None:
            on_step()
    return res


def make_manager(cfg: WorkloadConfig, shared: bool = False, **config: Any) -> KVCacheManager:
    """A manager sized for ``cfg`` by LightZero's rules (``config`` overrides fields)."""
    return KVCacheManager({"num_simulations": cfg.num_simulations, **config}, cfg.env_num,
                          shared=shared, entry_spec=cfg.spec)


def run_collectors(
    manager: CacheBackend,
    cfg: WorkloadConfig,
    on_step: Optional[Callable[[], None]] = None,
    timeout_s: float = 600.0,
    env_ids: Optional[Sequence[int]] = None,
    threads: Optional[int] = None,
    writer: int = 0,
) -> WorkloadResult:
    """Run collector threads (``cfg.collectors`` by default) over the envs ``env_ids`` (all by
    default), sharing ``manager`` (any :class:`CacheBackend`); ``on_step`` is called once per
    env step."""
    envs = list(range(cfg.env_num)) if env_ids is None else list(env_ids)
    count = min(threads or cfg.collectors, len(envs))
    groups = [envs[c::count] for c in range(count)]
    results: List[Optional[CollectorResult]] = [None] * count
    lock = threading.Lock()

    def tick(steps: int) -> None:
        if on_step is not None:
            with lock:
                for _ in range(steps):
                    on_step()

    def body(i: int) -> None:
        try:
            results[i] = run_collector(manager, cfg, groups[i], writer * 1000 + i,
                                       lambda: tick(len(groups[i])), writer)
        except BaseException as exc:  # reported, never swallowed: the caller checks errors
            r = CollectorResult()
            r.errors.append(f"collector {i}: {type(exc).__name__}: {exc}")
            results[i] = r

    torch.set_num_threads(1)  # tensor copies are small; threads are the parallelism here
    workers = [threading.Thread(target=body, args=(i,), name=f"collector-{i}") for i in range(count)]
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout_s)
    elapsed = time.perf_counter() - start
    total = CollectorResult()
    per: List[CollectorResult] = []
    for i, (t, r) in enumerate(zip(workers, results)):
        if t.is_alive():
            r = CollectorResult(errors=[f"collector {i}: still running after {timeout_s} s"])
        assert r is not None
        per.append(r)
        total.add(r)
    return WorkloadResult(total, elapsed, per)


def _process_main(handle: Any, cfg: WorkloadConfig, env_ids: List[int], threads: int, tag: int,
                  progress: Any, results: Any, ready: Any) -> None:
    """One worker process: attach the shared manager, wait for the others, run its collectors,
    report counters."""
    try:
        manager = KVCacheManager.attach(handle)
    except BaseException:
        ready.abort()  # no one waits for a worker that will never come
        raise
    try:
        ready.wait(60)
        def step() -> None:
            with progress.get_lock():
                progress.value += 1

        res = run_collectors(manager, cfg, on_step=step, env_ids=env_ids, threads=threads, writer=tag)
        results.put((tag, res.total.__dict__, res.elapsed_s))
    except BaseException as exc:
        results.put((tag, {"errors": [f"process {tag}: {type(exc).__name__}: {exc}"]}, 0.0))
    finally:
        manager.close()


def run_processes(
    manager: KVCacheManager,
    cfg: WorkloadConfig,
    processes: int,
    start_method: str = "spawn",
    on_progress: Optional[Callable[[int], None]] = None,
    timeout_s: float = 600.0,
) -> WorkloadResult:
    """Run the collectors as ``processes`` worker processes that attach the shared ``manager``
    by handle; each runs ``cfg.collectors // processes`` threads (at least one) over its envs.
    ``on_progress(env_steps_done)`` is called as work advances.

    Workers start collecting together, once all have attached (a barrier), so ``elapsed_s``
    compares with a threaded run's; process start and attach are reported as ``startup_s``.
    """
    import multiprocessing as mp
    import queue

    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= cfg.env_num:
        raise ConfigError(f"processes must be an int in [1, env_num={cfg.env_num}], got {processes!r}")
    handle = manager.handle()
    ctx: Any = mp.get_context(start_method)
    progress = ctx.Value("q", 0)
    results = ctx.Queue()
    ready = ctx.Barrier(processes + 1)
    threads = max(1, cfg.collectors // processes)
    procs = [
        ctx.Process(target=_process_main, name=f"collector-proc-{p}",
                    args=(handle, cfg, list(range(p, cfg.env_num, processes)), threads, p + 1, progress, results,
                          ready))
        for p in range(processes)
    ]
    launched = time.perf_counter()
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        ready.wait(timeout_s)  # every worker attached (a broken barrier: one died; reported below)
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    gathered: List[CollectorResult] = []
    while len(gathered) < processes and time.monotonic() < deadline:
        if on_progress is not None:
            on_progress(progress.value)
        try:
            _, counters, _ = results.get(timeout=0.1)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break  # a worker died without reporting
            continue
        gathered.append(CollectorResult(**counters))
    elapsed = time.perf_counter() - start
    if on_progress is not None:
        on_progress(progress.value)
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    total = CollectorResult()
    for r in gathered:
        total.add(r)
    missing = processes - len(gathered)
    if missing:
        total.errors.append(f"{missing} worker process(es) reported nothing (exit codes {[p.exitcode for p in procs]})")
    return WorkloadResult(total, elapsed, gathered, start - launched)
