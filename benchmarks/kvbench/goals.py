"""The goals check: the targets the issue set, measured value against target, PASS / MISS, or
n/a where not measured. Nothing is asserted. Every row a goal reads is found by the constants of
``names`` and every target is a constant here, so no label or number is written twice."""

from __future__ import annotations

from typing import List, Optional, Sequence

from .memory import ZERO_ALLOCATION_OPS
from .names import Checks, Comparison, Impl, Op
from .results import Results, Row, find, table, value
from .settings import BACKENDS
from .unizero import OURS as UNIZERO_OURS

SIZE = "96KiB"  # the goals are set for Atari entries
SIMS = 25
FLOOR_FACTOR, FLOOR_SLACK_US = 1.3, 3.0  # get(out=) and set <= 1.3 x copy_ + 3 us
ONE_THREAD_MAX_X = 1.15  # trace, 1 thread: time <= 1.15 x the legacy model's
TWO_THREADS_MIN_X = 1.5  # trace, 2 threads: throughput >= 1.5 x the legacy model's 1 thread
SHARED_MISS_MAX_US = 10.0  # shared pool, metadata path
CROSS_PROCESS_MIN_X = 10.0  # shared pool vs Manager().dict() and Ray
PROCESSES_MIN_X = 1.7  # trace, 2 processes vs 1
LEASE_MAX_US = 3.0
STORAGES_MAX = 0.0
HEAP_BLOCKS_MAX = 0.0099  # 0, but for free-list noise
ATARI_SHARE_MAX, CARTPOLE_SHARE_MAX = 0.02, 0.04  # the cache's share of a recurrent call (LightZero: 6.4 %, 15 %)
ATARI_FASTER_MIN_PCT = 4.5  # the whole recurrent call, against LightZero's own caches
SEAM_OPS_MAX = 12  # aten ops per recurrent call (LightZero: ~350 at 8 envs, 2 layers)


def goal(results: Results, section: str, goal_id: str, name: str, measured: Optional[float], target: str,
         limit: float, at_most: bool, unit: str = "", note: str = "") -> Row:
    """One goal row: PASS when ``measured`` is <= ``limit`` (``at_most``) or >= it; n/a when not
    measured (saying so when its section did not run)."""
    if measured is None:
        status = "n/a"
        note = note or ("not measured" if section in results else f"{section} not run")
    else:
        status = "PASS" if (measured <= limit if at_most else measured >= limit) else "MISS"
    return {"id": goal_id, "goal": name, "measured": measured, "unit": unit, "target": target, "status": status,
            "note": note}


def latency_goals(results: Results) -> List[Row]:
    """get(out=) and set against the copy_ floor: our entries against one copy_ of the same
    bytes, entries in LightZero's layout against a copy_ of each of the same tensors."""
    return (floor_goals(results, Op.COPY, "copy_", (Op.GET_OUT, Op.SET), "floor", ", fifo")
            + floor_goals(results, Op.COPY_PARTS, "copy_ of its tensors", Op.FOREIGN, "foreign", ""))


def floor_goals(results: Results, floor_op: str, floor_name: str, ops_measured: Sequence[str], goal_id: str,
                what: str) -> List[Row]:
    ops = table(results, "micro", "ops")
    floor = value(find(table(results, "micro", "floor"), size=SIZE, op=floor_op), "p50_us")
    limit = FLOOR_FACTOR * floor + FLOOR_SLACK_US if floor else 0.0
    target = (f"<= {FLOOR_FACTOR} x {floor_name} ({floor:.2f}) + {FLOOR_SLACK_US:g} = {limit:.2f} us" if floor
              else f"<= {FLOOR_FACTOR} x {floor_name} + {FLOOR_SLACK_US:g} us")
    out = []
    for backend in ("rw", "mutex"):
        for op in ops_measured:
            p50 = value(find(ops, size=SIZE, policy="fifo", backend=backend, op=op), "p50_us")
            out.append(goal(results, "micro", f"{goal_id}:{backend}:{op}", f"96 KiB {op}, in-process {backend}{what}: p50",
                            p50 if floor else None, target, limit, True, "us"))
    return out


def trace_goals(results: Results) -> List[Row]:
    ratios = table(results, "trace", "ratios")

    def ratio(checks: str, lock: str, comparison: str) -> Optional[float]:
        return value(find(ratios, sims=SIMS, checks=checks, lock=lock, comparison=comparison), "value")

    def mutex_note(checks: str, comparison: str) -> str:
        m = ratio(checks, "mutex", comparison)
        return "" if m is None else f"lock=mutex: {m:.3f}"

    out = []
    for checks in Checks.BOTH:
        one, two = Comparison.ONE_THREAD, Comparison.TWO_THREADS
        out.append(goal(results, "trace", f"trace_one_thread:{checks}",
                        f"trace 25 sims, 1 thread, rw ({checks}): time / legacy time", ratio(checks, "rw", one),
                        f"<= {ONE_THREAD_MAX_X}", ONE_THREAD_MAX_X, True, "x", mutex_note(checks, one)))
        out.append(goal(results, "trace", f"trace_two_threads:{checks}",
                        f"trace 25 sims, 2 threads, rw ({checks}): throughput / legacy 1 thread",
                        ratio(checks, "rw", two), f">= {TWO_THREADS_MIN_X}", TWO_THREADS_MIN_X, False, "x",
                        mutex_note(checks, two)))
    return out


def shared_goals(results: Results) -> List[Row]:
    ops = table(results, "micro", "ops")
    miss = value(find(ops, size=SIZE, policy="fifo", backend="shared", op=Op.MISS), "p50_us")
    out = [goal(results, "micro", "shared_miss", "shared pool get miss (metadata path), 96 KiB: p50", miss,
                f"<= {SHARED_MISS_MAX_US:g} us", SHARED_MISS_MAX_US, True, "us")]
    sx = find(table(results, "baselines", "shared_vs_cross_process"), size=SIZE) or {}
    md = min(sx["x_vs_manager_dict_get"], sx["x_vs_manager_dict_set"]) if "x_vs_manager_dict_get" in sx else None
    faster = f">= {CROSS_PROCESS_MIN_X:g}x faster"
    out.append(goal(results, "baselines", "shared_vs_manager_dict",
                    "shared pool vs Manager().dict(), 96 KiB (min of get, set)", md, faster, CROSS_PROCESS_MIN_X,
                    False, "x"))
    ray = sx.get("x_vs_ray_put_get")
    ray_row = find(table(results, "baselines", "cross_process"), size=SIZE, impl=Impl.RAY)
    ray_note = "" if ray is not None else (ray_row or {}).get("skipped") or ""
    out.append(goal(results, "baselines", "shared_vs_ray", "shared pool get+set vs Ray put+get, 96 KiB", ray, faster,
                    CROSS_PROCESS_MIN_X, False, "x", ray_note))
    ratios = table(results, "trace", "ratios")
    for checks in Checks.BOTH:
        r = value(find(ratios, sims=SIMS, checks=checks, comparison=Comparison.PROCESSES), "value")
        quick_note = "--quick runs 1 process" if r is None and "trace" in results else ""
        out.append(goal(results, "trace", f"processes:{checks}", f"trace 25 sims, 2 processes / 1 process ({checks})",
                        r, f">= {PROCESSES_MIN_X}", PROCESSES_MIN_X, False, "x", quick_note))
    return out


def lease_and_allocation_goals(results: Results) -> List[Row]:
    ops = table(results, "micro", "ops")
    out = []
    for backend in BACKENDS:
        p50 = value(find(ops, size=SIZE, policy="fifo", backend=backend, op=Op.LEASE), "p50_us")
        out.append(goal(results, "micro", f"lease:{backend}", f"lease hit, 96 KiB, {backend}: p50", p50,
                        f"<= {LEASE_MAX_US:g} us", LEASE_MAX_US, True, "us"))
    allocs = table(results, "memory", "allocations")
    for backend in BACKENDS:
        picked = [a for a in allocs if a["backend"] == backend and a["op"] in ZERO_ALLOCATION_OPS]
        storages = max((a["tensor_storages_per_op"] for a in picked), default=None)
        blocks = max((a["net_py_blocks_per_op"] for a in picked), default=None)
        out.append(goal(results, "memory", f"storages:{backend}",
                        f"get(out=)/set/lease, {backend}: tensor storages created per op (gross)", storages, "0",
                        STORAGES_MAX, True, "/op"))
        out.append(goal(results, "memory", f"heap:{backend}",
                        f"get(out=)/set/lease, {backend}: Python heap growth per op (net blocks)", blocks,
                        "0 (< 0.01: free-list noise)", HEAP_BLOCKS_MAX, True, "/op",
                        "transient Python objects per call not counted"))
    return out


def unizero_goals(results: Results) -> List[Row]:
    """The cache's share of LightZero's recurrent call, the call's speed-up, the seam's aten ops
    and bit-identical outputs (unizero section, 1 torch thread)."""
    calls, compare = table(results, "unizero", "calls"), table(results, "unizero", "compare")

    def ours(model: str) -> Optional[Row]:
        return find(calls, model=model, threads=1, mode=UNIZERO_OURS, call="recurrent")

    atari = find(compare, model="atari", threads=1, call="recurrent")
    ops = [r["ops_per_call"] for r in calls if r.get("mode") == UNIZERO_OURS and r.get("call") == "recurrent"
           and r.get("ops_per_call") is not None]
    mismatches = [r["output_mismatches"] for r in calls if "output_mismatches" in r]
    skipped = next((r["skipped"] for r in calls if "skipped" in r), "")
    out = []
    for model, limit in (("atari", ATARI_SHARE_MAX), ("cartpole", CARTPOLE_SHARE_MAX)):
        out.append(goal(results, "unizero", f"unizero_share:{model}",
                        f"{model}-size recurrent_inference, 1 thread: the cache's share of the call",
                        value(ours(model), "seam_share"), f"<= {limit:.0%}", limit, True, note=skipped))
    out.append(goal(results, "unizero", "unizero_faster:atari",
                    "atari-size recurrent_inference, 1 thread: % faster than with LightZero's caches",
                    value(atari, "faster_pct"), f">= {ATARI_FASTER_MIN_PCT:g} %", ATARI_FASTER_MIN_PCT, False, "%",
                    skipped))
    out.append(goal(results, "unizero", "unizero_ops", "aten ops the cache issues per recurrent call (max)",
                    max(ops) if ops else None, f"<= {SEAM_OPS_MAX}", SEAM_OPS_MAX, True, note=skipped))
    out.append(goal(results, "unizero", "unizero_identical", "output tensors differing from LightZero's caches",
                    sum(mismatches) if mismatches else None, "0", 0, True, note=skipped))
    return out


def goals(results: Results) -> List[Row]:
    """Every goal, in a fixed order, whatever ran."""
    return (latency_goals(results) + trace_goals(results) + shared_goals(results) + lease_and_allocation_goals(results)
            + unizero_goals(results))
