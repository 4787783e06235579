"""How far threads can scale a pool under the GIL: 2 threads against 1, on one shared pool and on
one pool per thread (no lock in common), for a bare ``copy_``, get(out=), set, and a 1:1 mix.

    .venv/bin/python benchmarks/bench_threads.py            # 96 KiB entries, both lock kinds
    .venv/bin/python benchmarks/bench_threads.py --calls 50000

Prints calls/s of one thread and the ratio of two threads' total to it. The "own pools" column
is the ceiling for any locking scheme: what remains there is the GIL (every call runs a few
microseconds of Python, and each torch copy hands the GIL over and takes it back). No
assertion: figures, not a test.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from _common import SIZES
from concurrent_kv import KVCachePool
from concurrent_kv.workload import fill_entry

SLOTS = 400


def calls_per_s(threads: int, op: str, lock: str, own_pools: bool, calls: int, size: str) -> float:
    spec = SIZES[size]
    pools = [KVCachePool(SLOTS, lock=lock, entry_spec=spec) for _ in range(threads if own_pools else 1)]
    stored = fill_entry(spec.empty_entry(), 7)
    for pool in pools:
        for key in range(SLOTS):
            pool.set(key, stored)
    start = threading.Barrier(threads + 1)

    def body(i: int) -> None:
        pool = pools[i % len(pools)]
        out, src = spec.empty_entry(), fill_entry(spec.empty_entry(), 9)
        start.wait()
        for j in range(calls):
            key = (i * SLOTS // 2 + j) % SLOTS
            if op == "copy_":
                out._block.copy_(src._block)
            elif op == "get" or (op == "mix" and j % 2):
                pool.get(key, out=out)
            else:
                pool.set(key, src)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    rate = threads * calls / (time.perf_counter() - t0)
    for pool in pools:
        pool.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000, help="calls per thread")
    parser.add_argument("--size", default="96KiB", choices=sorted(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {args.size} entries, {args.calls} calls per thread")
    print(f"{'op':6} {'lock':6} {'1 thread calls/s':>17} {'2 threads, one pool':>20} {'2 threads, own pools':>21}")
    for op in ("copy_", "get", "set", "mix"):
        for lock in ("rw", "mutex"):
            one = calls_per_s(1, op, lock, False, args.calls, args.size)
            shared = calls_per_s(2, op, lock, False, args.calls, args.size)
            own = calls_per_s(2, op, lock, True, args.calls, args.size)
            print(f"{op:6} {lock:6} {one:17,.0f} {shared / one:19.2f}x {own / one:20.2f}x")
            if op == "copy_":
                break


if __name__ == "__main__":
    main()
