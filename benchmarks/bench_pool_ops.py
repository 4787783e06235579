"""First measurement of pool get/set against the physical floor: one ``Tensor.copy_`` of the
same bytes, measured in the same run.

    ./dev bench                      # 96 KiB Atari entries, both lock kinds
    .venv/bin/python benchmarks/bench_pool_ops.py --repeat 7 --number 5000

Prints p50 (the median of ``--repeat`` timed batches of ``--number`` calls) per operation in
microseconds and its ratio to ``copy_``. No assertion: figures, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

from _common import SIZES
from concurrent_kv import KVCachePool
from concurrent_kv.workload import fill_entry


def per_call_us(fn, number: int, repeat: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["96KiB"], choices=sorted(SIZES))
    parser.add_argument("--number", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--slots", type=int, default=400, help="pool slots (UniZero's recur pool: 400)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 intra-op thread, p50 of {args.repeat} x {args.number} calls (us)")
    for size in args.sizes:
        spec = SIZES[size]
        entry = fill_entry(spec.empty_entry(), 7)
        src, dst = entry._block, torch.empty_like(entry._block)
        floor = per_call_us(lambda: dst.copy_(src), args.number, args.repeat)
        print(f"\n{size} entry ({spec.nbytes} B): copy_ floor {floor:.2f} us")
        print(f"{'lock':6} {'operation':22} {'p50 us':>8} {'x copy_':>8} {'- copy_ us':>10}")
        for lock in ("rw", "mutex"):
            pool = KVCachePool(args.slots, lock=lock, entry_spec=spec)
            for k in range(args.slots):
                pool.set(k, entry)
            out = spec.empty_entry()

            def lease() -> None:
                with pool.lease(7):
                    pass

            counter = iter(range(10**6, 10**9))
            ops = {  # the evicting set runs last: it evicts key 7, which the others hit
                "set (rewrite key)": lambda: pool.set(7, entry),
                "get hit (new copy)": lambda: pool.get(7),
                "get hit (out=)": lambda: pool.get(7, out=out),
                "get miss": lambda: pool.get(10**9),
                "lease hit": lease,
                "set (new key, evicts)": lambda: pool.set(next(counter), entry),
            }
            for name, fn in ops.items():
                t = per_call_us(fn, args.number, args.repeat)
                if name.startswith(("get hit", "lease")):
                    assert 7 in pool, "the measured key must stay resident"
                print(f"{lock:6} {name:22} {t:8.2f} {t / floor:8.2f} {t - floor:10.2f}")


if __name__ == "__main__":
    main()
