"""The trace section: the UniZero workload (``concurrent_kv.workload``), 8 envs x 25 / 50
simulations, as collector threads on our manager, as worker processes on a shared one, and on
LightZero's legacy rings (``LegacyRingBackend``) -- one collector loop on every backend."""

from __future__ import annotations

import contextlib
import statistics
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Tuple

from concurrent_kv import workload as wl
from concurrent_kv.testing.legacy_backend import LegacyRingBackend
from concurrent_kv.workload import WorkloadConfig, make_manager

from .names import Checks, Comparison, Variant
from .results import Row, Rows
from .settings import Settings, Task

NOTES = [
    "Trace, fairness: 'cache only' runs turn the workload's fill_entry / verify_entry / entry_writer into no-ops "
    "for ours and for the legacy model alike; 'fill+verify' runs keep them in both (the legacy backend copies each "
    "hit into the collector's out= buffer, which the loop verifies as it does ours). The goals are checked on both "
    "variants.",
    "Trace, same work: the legacy model runs the workload's own collector loop (run_collector, same seed) on "
    "concurrent_kv.testing.legacy_backend.LegacyRingBackend, checked by equal reads / hits / writes; its rings are "
    "sized as LightZero's (init 256 per env, recur sims x 8) and fully allocated before the clock starts, as our "
    "manager's storage is.",
    "Trace, threads: one collector clears the recur pool per search (as LightZero); several collectors share "
    "it, so each holds what it stores and releases its own entries instead (recur_clear=own), which is more work.",
    "Trace, processes: forked workers attach a shared manager, then start collecting together (a barrier): elapsed "
    "runs from that start to the last worker done, as a threaded run's does; fork and attach are in startup_s; every "
    "process configuration uses recur_clear=own; no keys are common to processes (shared_keys=0).",
]


@contextlib.contextmanager
def payload_checks(enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, the workload neither fills written entries with their key nor
    verifies reads (``fill_entry``, ``verify_entry``, ``entry_writer`` become no-ops), so a run
    times the cache alone. The collector loop looks these up in its module at each call, and
    forked workers inherit the module as it is, so one patch covers every backend."""
    if enabled:
        yield
        return
    saved = wl.fill_entry, wl.verify_entry, wl.entry_writer
    wl.fill_entry = lambda entry, key, writer=0: entry
    wl.verify_entry = lambda entry, key: True
    wl.entry_writer = lambda entry: 0
    try:
        yield
    finally:
        wl.fill_entry, wl.verify_entry, wl.entry_writer = saved


def trace_config(sims: int, steps: int, collectors: int, recur_clear: str = "auto",
                 shared_keys: float = 0.0) -> WorkloadConfig:
    return WorkloadConfig(env_num=8, collectors=collectors, num_simulations=sims, steps=steps,
                          recur_clear=recur_clear, shared_keys=shared_keys)


def trace_row(variant: str, cfg: WorkloadConfig, lock: str, threads: int, processes: int, checks: bool,
              result: wl.WorkloadResult) -> Row:
    total, elapsed = result.total, result.elapsed_s
    calls = cfg.steps * cfg.num_simulations  # batched recurrent calls (all 8 envs each)
    return {
        "variant": variant, "sims": cfg.num_simulations, "lock": lock, "threads": threads, "processes": processes,
        "checks": Checks.FILL_VERIFY if checks else Checks.CACHE_ONLY, "recur_clear": cfg.clear_mode(),
        "env_steps": total.steps, "ops": total.ops, "reads": total.reads, "hits": total.hits, "writes": total.writes,
        "verified": total.verified, "corrupt": total.corrupt, "errors": len(total.errors),
        "elapsed_s": elapsed, "env_steps_per_s": total.steps / elapsed, "ops_per_s": total.ops / elapsed,
        "us_per_recurrent_call": elapsed / calls * 1e6,
    }


def run_ours_threads(sims: int, steps: int, threads: int, lock: str, checks: bool) -> Row:
    """``threads`` collector threads over 8 envs on one in-process manager."""
    cfg = trace_config(sims, steps, threads)
    with payload_checks(checks), make_manager(cfg, lock=lock) as manager:
        result = wl.run_collectors(manager, cfg)
        manager.check()
    return trace_row(Variant.OURS, cfg, lock, threads, 0, checks, result)


def run_ours_processes(sims: int, steps: int, processes: int, threads: int, lock: str, checks: bool,
                       shared_keys: float = 0.0) -> Row:
    """``processes`` forked workers x ``threads`` collector threads on one shared manager. Every
    configuration releases its own holds per search (``recur_clear="own"``), so the work is the same."""
    cfg = trace_config(sims, steps, processes * threads, recur_clear="own", shared_keys=shared_keys)
    with payload_checks(checks), make_manager(cfg, shared=True, lock=lock) as manager:
        result = wl.run_processes(manager, cfg, processes, "fork")
        manager.check()
    row = trace_row(Variant.SHARED, cfg, lock, threads, processes, checks, result)
    row["startup_s"] = result.startup_s
    return row


def run_legacy(sims: int, steps: int, checks: bool) -> Row:
    """One collector thread over 8 envs on LightZero's rings: the operations ``run_ours_threads``
    makes with one thread, in the same order."""
    cfg = trace_config(sims, steps, 1)
    backend = LegacyRingBackend(cfg.env_num, cfg.num_simulations, cfg.spec)
    with payload_checks(checks):
        result = wl.run_collectors(backend, cfg)
    return trace_row(Variant.LEGACY, cfg, "none", 1, 0, checks, result)


def trace_tasks(s: Settings) -> List[Task]:
    """Goal-relevant runs (25 sims, 1 and 2 threads, legacy) are repeated and interleaved, with
    and without payload checks; the rest run once, with checks (as the workload ships)."""
    tasks: List[Task] = []
    steps = s.trace_steps

    def add(label: str, fn: Callable[[], Any]) -> None:
        tasks.append(Task("trace", "runs", label, fn))

    for _ in range(s.trace_repeats):
        for checks in (False, True):
            tag = Checks.FILL_VERIFY if checks else Checks.CACHE_ONLY
            add(f"trace legacy 25 sims {tag}", partial(run_legacy, 25, steps, checks))
            for threads in (1, 2):
                for lock in s.trace_locks:
                    add(f"trace ours 25 sims {threads}t {lock} {tag}",
                        partial(run_ours_threads, 25, steps, threads, lock, checks))
        for procs, threads in s.trace_processes:
            for checks in (False, True):
                tag = Checks.FILL_VERIFY if checks else Checks.CACHE_ONLY
                add(f"trace shared 25 sims {procs}p x {threads}t {tag}",
                    partial(run_ours_processes, 25, steps, procs, threads, "rw", checks))
    for sims in s.trace_sims:
        for threads in s.trace_threads:
            for lock in s.trace_locks:
                if sims == 25 and threads in (1, 2):
                    continue  # measured above
                add(f"trace ours {sims} sims {threads}t {lock}",
                    partial(run_ours_threads, sims, steps, threads, lock, True))
        if sims != 25:  # 25 is measured above
            add(f"trace legacy {sims} sims", partial(run_legacy, sims, steps, True))
            for procs, threads in s.trace_processes:
                add(f"trace shared {sims} sims {procs}p x {threads}t",
                    partial(run_ours_processes, sims, steps, procs, threads, "rw", True))
    return tasks


def _median_table(runs: Rows) -> Rows:
    """One row per configuration: the run of median elapsed time, with every run's time."""
    groups: Dict[Tuple[Any, ...], Rows] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["sims"], r["lock"], r["threads"], r["processes"], r["checks"]), []).append(r)
    table = []
    for group in groups.values():
        mid = sorted(group, key=lambda r: r["elapsed_s"])[len(group) // 2]
        table.append({**mid, "repeats": len(group), "elapsed_runs_s": [r["elapsed_s"] for r in group]})
    table.sort(key=lambda r: (r["checks"], r["sims"], r["variant"], r["processes"], r["threads"], r["lock"]))
    return table


def _ratio(sims: int, checks: str, lock: str, comparison: str, num: Rows, den: Rows, **extra: Any) -> List[Row]:
    """Runs are interleaved: pair the i-th of each, take the median ratio and its range."""
    pairs = [a["elapsed_s"] / b["elapsed_s"] for a, b in zip(num, den)]  # time ratio
    if not pairs:
        return []
    if comparison in (Comparison.TWO_THREADS, Comparison.PROCESSES):
        pairs = [1 / x for x in pairs]  # a throughput ratio: both run the same env steps
    return [{"sims": sims, "checks": checks, "lock": lock, "comparison": comparison,
             "value": statistics.median(pairs), "min": min(pairs), "max": max(pairs), "pairs": len(pairs), **extra}]


def _same_ops(ours: Rows, legacy: Rows) -> bool:
    counts = lambda r: (r["reads"], r["hits"], r["writes"])  # noqa: E731
    return bool(ours and legacy) and all(counts(a) == counts(b) for a, b in zip(ours, legacy))


def summarize_trace(trace: Dict[str, Rows]) -> None:
    """Median over repeats per configuration, then the legacy and process comparisons."""
    all_runs = trace.get("runs", [])
    trace["table"] = _median_table(all_runs)

    def runs(**match: Any) -> Rows:
        return [r for r in all_runs if all(r[k] == v for k, v in match.items())]

    ratios: Rows = []
    sims_measured = sorted({r["sims"] for r in trace["table"]})
    for checks in Checks.BOTH:
        for sims in sims_measured:
            legacy = runs(variant=Variant.LEGACY, sims=sims, checks=checks)
            for lock in ("rw", "mutex"):
                one = runs(variant=Variant.OURS, sims=sims, threads=1, lock=lock, checks=checks)
                ratios += _ratio(sims, checks, lock, Comparison.ONE_THREAD, one, legacy,
                                 same_op_sequence=_same_ops(one, legacy))
                ratios += _ratio(sims, checks, lock, Comparison.TWO_THREADS,
                                 runs(variant=Variant.OURS, sims=sims, threads=2, lock=lock, checks=checks), legacy)
        for sims in sims_measured:
            ratios += _ratio(sims, checks, "rw", Comparison.PROCESSES,
                             runs(variant=Variant.SHARED, sims=sims, processes=2, threads=1, checks=checks),
                             runs(variant=Variant.SHARED, sims=sims, processes=1, threads=1, checks=checks))
    trace["ratios"] = ratios
