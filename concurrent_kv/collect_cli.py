"""``python -m concurrent_kv collect``: real UniZero collectors in worker processes, two ways.

N spawned processes each run LightZero 0.2.0's own ``MuZeroCollector`` and UniZero policy (see
:mod:`concurrent_kv.integrations.lightzero_collect`). Phase A: with LightZero's per-process
caches. Phase B: the same collectors, seeds and length, on one shared manager. The command
reports both and their ratio, per-collector and per-pool hit rates, hits on entries another
collector wrote, KV memory and misses recomputed; ``--json PATH`` writes the same numbers.

It needs the LightZero environment (``./dev collect`` makes it); the parser loads without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, TextIO

from .cli import format_table
from .errors import ConfigError
from .entry import EntrySpec
from .integrations.lightzero_collect import ENVS, PHASES, CollectSettings, entry_spec, shared_manager, worker_main
from .manager import KVCacheManager

__all__ = ["register_collect", "run_collect", "run_phase", "PhaseResult"]

#: How long a phase may take beyond its own length: spawning, importing LightZero, building.
STARTUP_LIMIT_S = 600.0
#: A ``--steps`` phase's limit (it has no length in seconds).
STEPS_LIMIT_S = 3600.0
TITLES = {"lightzero": "LightZero's caches", "shared": "shared manager"}
_COUNTERS = ("root_hits", "root_queries", "recur_hits", "recur_queries")


@dataclass
class PhaseResult:
    """One phase: each collector's report (LightZero's counters, steps, time) and any errors."""

    phase: str
    reports: List[Dict[str, Any]] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    startup_s: float = 0.0
    pools: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # shared phase: per-pool counters
    kv_bytes: int = 0  # shared phase: the manager's pools; LightZero phase: its pools' tensors

    def total(self, name: str) -> int:
        return sum(int(r.get(name, 0)) for r in self.reports)

    @property
    def elapsed_s(self) -> float:
        """The phase's length: collectors start together, so the slowest one's time."""
        return max((r["elapsed_s"] for r in self.reports), default=0.0)

    @property
    def steps_per_s(self) -> float:
        return self.total("steps") / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def steps_per_cpu_s(self) -> float:
        """Env steps per second of the collectors' own CPU time: less sensitive than wall time to
        other jobs on a busy machine, though not immune (shared CPU caches, a VM's stolen time)."""
        cpu = sum(r.get("cpu_s", 0.0) for r in self.reports)
        return self.total("steps") / cpu if cpu else 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.reports)

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.update(steps=self.total("steps"), elapsed_s=self.elapsed_s, steps_per_s=self.steps_per_s,
                   steps_per_cpu_s=self.steps_per_cpu_s)
        return out


# -- running one phase -----------------------------------------------------------------------------

def _progress_line(phase: str, progress: Any, started: float) -> str:
    done = list(progress)
    elapsed = time.perf_counter() - started
    return (f"{TITLES[phase]}: {elapsed:5.1f} s  {sum(done)} env steps  {sum(done) / max(elapsed, 1e-9):6.1f}/s"
            f"  per collector {done}")


def _release_gates(gates: Any, manager: Optional[KVCacheManager], limit_s: float) -> None:
    """Wait until every collector is built and warm, zero the pools' counters, let them go."""
    try:
        gates[0].wait(limit_s)
        if manager is not None:
            manager.reset_stats()
        gates[1].wait(limit_s)
    except threading.BrokenBarrierError:
        pass  # a collector failed: its report says why


def _gather(procs: List[Any], results: Any, progress: Any, phase: str, limit_s: float, started: float,
            out: Optional[TextIO]) -> List[Dict[str, Any]]:
    """Every collector's report, printing a progress line a second; stops early if all died."""
    reports: List[Dict[str, Any]] = []
    deadline, next_line = time.monotonic() + limit_s, time.monotonic() + 1.0
    while len(reports) < len(procs) and time.monotonic() < deadline:
        if out is not None and time.monotonic() >= next_line:
            print(_progress_line(phase, progress, started), file=out, flush=True)
            next_line += 1.0
        try:
            reports.append(results.get(timeout=0.2))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    return reports


def _limit(settings: CollectSettings) -> float:
    return STEPS_LIMIT_S if settings.steps else settings.seconds + STARTUP_LIMIT_S


def run_phase(settings: CollectSettings, phase: str, manager: Optional[KVCacheManager], workdir: str,
              out: Optional[TextIO] = sys.stderr) -> PhaseResult:
    """Run ``settings.collectors`` spawned collector processes once; ``manager`` (shared) for
    the ``"shared"`` phase, None for LightZero's own caches."""
    if phase not in PHASES:
        raise ConfigError(f"phase must be one of {PHASES}, got {phase!r}")
    if (phase == "shared") != (manager is not None):
        raise ConfigError("the shared phase runs on a shared manager; the lightzero phase on none")
    n, limit = settings.collectors, _limit(settings)
    ctx: Any = mp.get_context("spawn")
    progress, results = ctx.Array("q", n, lock=False), ctx.Queue()
    gates = (ctx.Barrier(n + 1), ctx.Barrier(n + 1))
    handle = None if manager is None else manager.handle()
    folder = os.path.join(workdir, phase)  # each collector's logs, and MuZeroCollector's
    os.makedirs(folder, exist_ok=True)
    procs = [ctx.Process(target=worker_main, name=f"collector-{i}",
                         args=(settings, i, phase, handle, progress, results, gates, folder)) for i in range(n)]
    launched = time.perf_counter()
    for proc in procs:
        proc.start()
    _release_gates(gates, manager, limit)
    started = time.perf_counter()
    raw = _gather(procs, results, progress, phase, limit, started, out)
    for proc in procs:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    result = PhaseResult(phase, startup_s=started - launched)
    for report in sorted(raw, key=lambda r: r["index"]):
        if "error" in report:
            result.errors.append(f"collector {report['index']}: {report['error']}\n{report['traceback']}")
        else:
            result.reports.append(report)
    if len(raw) < n:
        result.errors.append(f"{n - len(raw)} collector(s) reported nothing (exit codes {[p.exitcode for p in procs]})")
    return result


def _shared_phase(settings: CollectSettings, spec: EntrySpec, workdir: str, out: Optional[TextIO]) -> PhaseResult:
    """Phase B: the manager lives in this process; the collectors attach it by handle."""
    with shared_manager(settings, spec) as manager:
        result = run_phase(settings, "shared", manager, workdir, out)
        result.pools = {p.name: {"capacity": p.capacity, **p.stats_snapshot().as_dict()}
                        for p in manager.pools()}
        result.kv_bytes = sum(p.nbytes for p in manager.pools())
        manager.check()
    return result


# -- the report --------------------------------------------------------------------------------------

def _rate(hits: int, queries: int) -> str:
    return f"{hits / queries:.1%}" if queries else "-"


def _recomputed(p: Dict[str, Any]) -> int:
    """Lookups that found nothing, so the world model ran the transformer over the state instead."""
    return p["root_queries"] - p["root_hits"] + p["recur_queries"] - p["recur_hits"]


def _phase_rows(phases: List[PhaseResult]) -> str:
    rows = []
    for p in phases:
        t = {k: p.total(k) for k in _COUNTERS}
        rows.append([TITLES[p.phase], len(p.reports), p.total("steps"), f"{p.elapsed_s:.2f}", f"{p.steps_per_s:.1f}",
                     f"{p.steps_per_cpu_s:.1f}", _rate(t["root_hits"], t["root_queries"]),
                     _rate(t["recur_hits"], t["recur_queries"]), _recomputed(t)])
    return format_table(rows, ["phase", "collectors", "env steps", "seconds", "env steps/s", "steps/CPU s",
                               "root hit rate", "recur hit rate", "recomputed"])


def _collector_rows(phases: List[PhaseResult]) -> str:
    rows = [[TITLES[p.phase], r["index"], f"{r['first_env']}..{r['first_env'] + r['envs'] - 1}", r["steps"],
             f"{r['steps'] / r['elapsed_s']:.1f}" if r["elapsed_s"] else "-",
             _rate(r["root_hits"], r["root_queries"]), _rate(r["recur_hits"], r["recur_queries"]),
             r.get("foreign_hits", "-"), r.get("rejected", "-")] for p in phases for r in p.reports]
    return format_table(rows, ["phase", "collector", "envs", "env steps", "env steps/s", "root hits", "recur hits",
                               "foreign hits", "refused stores"])


def _pool_rows(pools: Dict[str, Dict[str, Any]]) -> str:
    rows = [[name, s["capacity"], s["hits"], s["misses"], f"{s['hit_rate']:.1%}", s["inserts"], s["updates"],
             s["evictions"]] for name, s in pools.items()]
    return format_table(rows, ["pool", "slots", "hits", "misses", "hit rate", "inserts", "updates", "evictions"])


def _describe(settings: CollectSettings) -> str:
    weights = ("a checkpoint" if settings.checkpoint else
               f"seed {settings.seed}" + (", LightZero's zero heads" if settings.zero_heads else ", random heads"))
    length = f"{settings.steps} env steps" if settings.steps else f"{settings.seconds:g} s"
    return (f"{settings.collectors} collector processes x {settings.envs} {settings.env} envs, {settings.simulations} "
            f"simulations, {settings.threads} torch thread(s) each; weights: {weights}; {length} per phase")


def report(settings: CollectSettings, legacy: PhaseResult, shared: PhaseResult) -> str:
    """The final text: both phases, their ratio, per collector, per pool, KV memory, misses."""
    ratio = shared.steps_per_s / legacy.steps_per_s if legacy.steps_per_s else float("nan")
    cpu_ratio = shared.steps_per_cpu_s / legacy.steps_per_cpu_s if legacy.steps_per_cpu_s else float("nan")
    recomputed = [_recomputed({k: p.total(k) for k in _COUNTERS}) for p in (legacy, shared)]
    lines = [
        _describe(settings), "", _phase_rows([legacy, shared]),
        f"shared manager / LightZero's caches: {ratio:.2f}x env steps/s, {cpu_ratio:.2f}x env steps per CPU second",
        "", "per collector (root/recur hits: LightZero's own counters; foreign hits: on entries another "
        "collector wrote):", _collector_rows([legacy, shared]),
        "", "shared manager pools (timed part):", _pool_rows(shared.pools),
        "", f"KV memory: shared manager {shared.kv_bytes / 1024:.0f} KiB in its pools (all slots, allocated up "
        f"front) vs LightZero's caches {legacy.kv_bytes / 1024:.0f} KiB in its pools' KeysValues tensors "
        f"({settings.collectors} processes together)",
        f"misses recomputed by the world model: {recomputed[1]} (LightZero's caches: {recomputed[0]}); stores the "
        f"shared pools refused (every slot held; counted by each collector): {shared.total('rejected')}",
        f"hits on entries another collector wrote: {shared.total('foreign_hits')}",
    ]
    return "\n".join(lines)


def _failures(phases: List[PhaseResult], workdir: str) -> str:
    """Every collector's error with its traceback, and where the collectors' logs are kept."""
    lines = []
    for p in phases:
        for error in p.errors:
            lines.append(f"{TITLES[p.phase]}: {error}")
    if lines:
        lines.append(f"collector logs: {workdir}")
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------------

def register_collect(sub: Any) -> None:
    """Add the ``collect`` subcommand to the ``python -m concurrent_kv`` parser."""
    d = CollectSettings()
    p = sub.add_parser("collect", help="real LightZero UniZero collectors in processes: LightZero's caches vs one "
                                       "shared manager")
    p.add_argument("--collectors", type=int, default=d.collectors, help="collector processes (default %(default)s)")
    p.add_argument("--envs", type=int, default=d.envs, help="envs per collector (default %(default)s)")
    p.add_argument("--simulations", type=int, default=d.simulations, help="MCTS simulations (default %(default)s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=d.seconds, help="each phase's length (default %(default)s)")
    length.add_argument("--steps", type=int, default=None, help="or: env steps per phase, all collectors together")
    p.add_argument("--env", choices=sorted(ENVS), default=d.env)
    p.add_argument("--checkpoint", default=None, help="model weights (LightZero checkpoint or state dict); "
                                                      "default: random, seeded")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--zero-heads", action="store_true",
                   help="keep LightZero's zero-initialised heads (untrained: every search node has one latent, "
                        "one cache key); default: seeded random heads")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON to PATH")
    p.add_argument("--keep-logs", action="store_true", help="keep the collectors' logs and working folder")
    p.set_defaults(handler=run_collect)


def _settings(args: argparse.Namespace) -> CollectSettings:
    return CollectSettings(collectors=args.collectors, envs=args.envs, simulations=args.simulations,
                           seconds=args.seconds, steps=args.steps, env=args.env, checkpoint=args.checkpoint,
                           threads=args.threads, seed=args.seed, zero_heads=args.zero_heads)


def run_collect(args: argparse.Namespace) -> int:
    """Phase A, then phase B; print the report; 0 when every collector of both phases reported."""
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("lzero") is None:
        print("collect: needs LightZero 0.2.0 and its collector's packages: run it as ./dev collect", file=sys.stderr)
        return 2
    spec = entry_spec(settings)  # the zoo config compiles here, before any process starts
    workdir = tempfile.mkdtemp(prefix="concurrent_kv_collect_")
    phases = [run_phase(settings, "lightzero", None, workdir), _shared_phase(settings, spec, workdir, sys.stderr)]
    phases[0].kv_bytes = phases[0].total("legacy_pool_bytes")
    ok = all(p.ok for p in phases)
    print(report(settings, *phases) if ok else _failures(phases, workdir))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": asdict(settings), "ok": ok, "phases": {p.phase: p.as_dict() for p in phases},
                       "ratio": phases[1].steps_per_s / phases[0].steps_per_s if phases[0].steps_per_s else None,
                       "cpu_ratio": (phases[1].steps_per_cpu_s / phases[0].steps_per_cpu_s
                                     if phases[0].steps_per_cpu_s else None)},
                      f, indent=2)
    if ok and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1
