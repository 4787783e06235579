"""Worker-process bodies for the multiprocess tests (top level, so spawn can import them)."""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any, Dict

import torch

from concurrent_kv import EntrySpec, KVCachePool, PoolExhaustedError
from concurrent_kv.workload import fill_entry, verify_entry


def read_digest(handle: Any, key: int, out: Any) -> None:
    """Attach, read ``key``, send back a digest of its bytes and sizes."""
    torch.set_num_threads(1)
    pool = KVCachePool.attach(handle)
    try:
        got = pool.get(key)
        if got is None:
            out.put(None)
        else:
            sizes = tuple(c._size for layer in got._keys_values for c in (layer._k_cache, layer._v_cache))
            out.put((hashlib.sha256(got._block.numpy().tobytes()).hexdigest(), sizes))
    finally:
        pool.close()


def hammer(handle: Any, spec: EntrySpec, seed: int, threads: int, seconds: float, keys: int, out: Any) -> None:
    """Several threads of random ops on a shared pool; every read verified; counts sent back."""
    import threading

    torch.set_num_threads(1)
    pool = KVCachePool.attach(handle)
    totals: Dict[str, int] = {"hits": 0, "misses": 0, "sets": 0, "corrupt": 0, "ops": 0, "exhausted": 0}
    guard = threading.Lock()
    deadline = time.monotonic() + seconds
    errors = []

    def body(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        mine = dict.fromkeys(totals, 0)
        buf = spec.empty_entry()
        entry = spec.empty_entry()
        try:
            while time.monotonic() < deadline and mine["ops"] < 100_000:
                mine["ops"] += 1
                key = rng.randrange(keys)
                r = rng.random()
                if r < 0.45:
                    got = pool.get(key, out=buf)
                    mine["hits" if got is not None else "misses"] += 1
                    if got is not None and not verify_entry(got, key):
                        mine["corrupt"] += 1
                elif r < 0.6:
                    with pool.lease(key) as view:
                        mine["hits" if view is not None else "misses"] += 1
                        if view is not None and not verify_entry(view, key):
                            mine["corrupt"] += 1
                elif r < 0.97:
                    try:
                        pool.set(key, fill_entry(entry, key, seed), priority=rng.random())
                        mine["sets"] += 1
                    except PoolExhaustedError:
                        mine["exhausted"] += 1
                else:
                    pool.delete(key)
        except BaseException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        with guard:
            for k, v in mine.items():
                totals[k] += v

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    pool.close()
    out.put((totals, errors))


def hold_lock_forever(handle: Any, ready: Any) -> None:
    """Take the pool's exclusive lock and never let go (killed by the test)."""
    pool = KVCachePool.attach(handle)
    pool._lock.acquire_write(5.0)
    ready.set()
    time.sleep(600)


def die_mid_write(handle: Any, spec: EntrySpec, key: int, ready: Any) -> None:
    """Start writing ``key`` and stop halfway, in WRITING state (killed by the test)."""
    pool = KVCachePool.attach(handle)

    def stall(point: str) -> None:
        if point == "writing":
            ready.set()
            time.sleep(600)

    pool._fault = stall
    pool.set(key, fill_entry(spec.empty_entry(), key, 99))


def hold_leases_forever(handle: Any, keys: Any, ready: Any) -> None:
    """Lease every key in ``keys`` and never release (killed by the test)."""
    import contextlib

    pool = KVCachePool.attach(handle)
    stack = contextlib.ExitStack()
    for key in keys:
        view = stack.enter_context(pool.lease(key))
        assert view is not None
    ready.set()
    time.sleep(600)
