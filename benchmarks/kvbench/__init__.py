"""The benchmark of concurrent_kv: per-call latency against the physical floor, baselines
(LightZero's legacy ring pool, a dict + lock, cachetools, Manager().dict(), torch queues, Ray),
the realistic UniZero trace (threads, processes, the legacy model), memory and allocations, and
hit rates of the eviction policies against Belady's optimum. Run from the repository root:

    python -m benchmarks.kvbench                      # the default sections (~3.5 min on 2 cores)
    python -m benchmarks.kvbench --quick              # a smoke run (< 1 min)
    python -m benchmarks.kvbench --only micro trace
    python -m benchmarks.kvbench --preset pool-ops    # or shared, threads
    python -m benchmarks.kvbench --out results/mine

Sections (``--only NAME ...``; the first five by default):

* ``micro``: p50/p99 latency and ops/s of get (new entry), get(out=), get miss, lease hit,
  set (rewrite), hierarchical_get (init miss + recur hit, through a KVCacheManager), get(out=) and
  set with entries in LightZero's own layout (a tensor per K/V cache, against copy_ of those
  tensors) and set (new key, evicting), per entry size (8 KiB, 96 KiB, 1.27 MiB), policy (fifo, lru, priority) and
  backend (in-process ``rw`` / ``mutex`` lock, ``shared`` memory), each against the floor: one
  ``Tensor.copy_`` of the same bytes, measured in the same run.
* ``baselines``: LegacyRingPool (set; get + copy into a staging entry, as LightZero's world
  model does), a dict + threading.Lock pool of clones, cachetools.LRUCache + lock,
  Manager().dict(), torch.multiprocessing.Queue and Ray put+get.
* ``trace``: the UniZero workload (``concurrent_kv.workload``): 8 envs x 25 / 50 simulations,
  1/2/4 collector threads, 1/2 worker processes on a shared manager, rw vs mutex; and the same
  collector loop on LightZero-sized rings (``concurrent_kv.testing.legacy_backend``).
* ``memory``: bytes per entry and per slot, metadata per slot, allocations per operation in
  steady state (tracemalloc, and tensor storages created, counted by a TorchDispatchMode).
* ``hitrate``: recur-pool key traces recorded from the workload, replayed through FIFO, LRU and
  PRIORITY pools at several capacities, beside Belady's offline optimum.
* ``threads``: 2 threads against 1, on one pool and on a pool each: the GIL ceiling.
* ``scaling``: 1 against 2 worker processes, on one shared pool and as UniZero collectors.
* ``unizero``: LightZero 0.2.0's real UniZero world model (Atari- and CartPole-sized), its own
  caches against the adapter's batched seam, per initial_inference and recurrent_inference
  call: time, the cache seam's share, its aten ops, identical outputs. It needs lightzero:
  ``PYTHONPATH=. .venv-lightzero/bin/python -m benchmarks.kvbench --only unizero`` (elsewhere
  it reports itself skipped).

Presets (``--preset``) are focused runs of the same code: ``pool-ops`` (micro: fifo, rw and mutex,
400 slots, 96 KiB), ``shared`` (micro for rw and shared pools, Manager dict and torch queue,
scaling), ``threads``. cachetools, Ray and the plots need the ``bench`` extra
(``pip install -e '.[bench]'``, which ``./dev bench`` does); without it those baselines say
``skipped``. Results go to ``--out`` (default ``results/<run>-<timestamp>/``): ``results.json``,
``results.md`` and PNG plots. The goals check at the end prints measured value, target and
PASS / MISS (``n/a`` where not measured); nothing is asserted.

Modules: ``settings`` (what is measured), ``names`` (row labels), ``timing`` (the one way of
timing), ``fixtures``, one module per section (``micro``, ``baselines`` with ``crossproc``,
``trace``, ``memory``, ``hitrate``, ``threads``), ``goals``, ``report``, ``plots``, ``runner``,
``cli``; ``unizero`` with its own driver of the real model.
"""
