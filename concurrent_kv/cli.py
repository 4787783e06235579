"""Command line: ``python -m concurrent_kv demo`` (UniZero-shaped collectors) and
``python -m concurrent_kv shm list|clean`` (the shared-memory files of every pool: see them,
remove those of dead runs), and ``collect`` (real LightZero collectors: :mod:`concurrent_kv.collect_cli`).
Installed as ``concurrent-kv``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import List, Optional, Sequence, TextIO

from . import shm_inspect
from .locks import LOCK_KINDS
from .manager import KVCacheManager
from .workload import WorkloadConfig, WorkloadResult, make_manager, run_collectors, run_processes

__all__ = ["main"]


class ProgressBar:
    """A one-line text progress bar on a terminal stream (no dependency)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self._start = time.perf_counter()
        self._last = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= 0.1 or self.done >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        rate = self.done / max(now - self._start, 1e-9)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} env steps  {rate:7.1f} steps/s")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def format_table(rows: List[List[object]], header: List[str]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def report(manager: KVCacheManager, cfg: WorkloadConfig, result: WorkloadResult, processes: int = 0) -> str:
    """The demo's final table: per-pool stats, throughput and verified reads."""
    rows: List[List[object]] = []
    for pool in manager.pools():
        s = pool.stats_snapshot()
        rows.append([pool.name, f"{len(pool)}/{pool.capacity}", s.hits, s.misses, f"{s.hit_rate:.1%}",
                     s.inserts, s.updates, s.evictions])
    table = format_table(rows, ["pool", "used", "hits", "misses", "hit rate", "inserts", "updates", "evictions"])
    t = result.total
    entry_kib = cfg.spec.nbytes / 1024
    lines = [
        table,
        "",
        (f"worker processes: {processes} x {max(1, cfg.collectors // processes)} threads" if processes
         else f"collectors (threads): {cfg.collectors}")
        + f"   envs: {cfg.env_num}   simulations/search: {cfg.num_simulations}"
        f"   entry: {entry_kib:.0f} KiB   lock: {manager.config.lock}   shared memory: {manager.shared}",
        f"env steps: {t.steps}   cache ops: {t.ops}   elapsed: {result.elapsed_s:.2f} s"
        + (f" (+{result.startup_s:.2f} s to start and attach the workers)" if processes else "") + "   "
        f"ops/s: {result.ops_per_s:,.0f}   env steps/s: {t.steps / result.elapsed_s:,.1f}",
        f"reads: {t.reads}   hits: {t.hits}   verified against their key: {t.verified}/{t.hits}"
        f"   corrupt: {t.corrupt}   errors: {len(t.errors)}",
        f"hits that crossed a process boundary: {t.foreign_hits}",
    ]
    lines.extend(t.errors[:5])
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m concurrent_kv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="UniZero-shaped collectors sharing one KVCacheManager")
    d = WorkloadConfig()
    demo.add_argument("--envs", type=int, default=d.env_num, help="environments (default %(default)s)")
    demo.add_argument("--collectors", type=int, default=d.collectors, help="collector threads (default %(default)s)")
    demo.add_argument("--simulations", type=int, default=d.num_simulations, help="MCTS simulations per search")
    demo.add_argument("--steps", type=int, default=50, help="env steps per env (default %(default)s)")
    demo.add_argument("--episode-length", type=int, default=d.episode_length, help="steps between init-pool clears")
    demo.add_argument("--layers", type=int, default=d.num_layers)
    demo.add_argument("--heads", type=int, default=d.num_heads)
    demo.add_argument("--context", type=int, default=d.context_length, help="tokens per entry (context_length)")
    demo.add_argument("--head-dim", type=int, default=d.head_dim)
    demo.add_argument("--processes", type=int, default=0,
                      help="run the collectors in N worker processes sharing the manager (default: threads only)")
    demo.add_argument("--start-method", choices=["spawn", "fork", "forkserver"], default="spawn")
    demo.add_argument("--shared-keys", type=float, default=None,
                      help="chance a child state is common to all envs (default 0.25 with --processes, else 0)")
    demo.add_argument("--lock", choices=list(LOCK_KINDS), default="rw", help="pool lock (default %(default)s)")
    demo.add_argument("--recur-clear", choices=["auto", "global", "own", "none"], default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_shm_parser(sub)
    from .collect_cli import register_collect  # real LightZero collectors: their own module

    register_collect(sub)
    return parser


def _add_shm_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    shm = sub.add_parser("shm", help="list or remove the shared-memory files of shared pools")
    actions = shm.add_subparsers(dest="shm_command", required=True)
    listing = actions.add_parser("list", help="every manager and pool: owner, workers, size, age, use, hit rate")
    cleaning = actions.add_parser("clean", help="remove the files that no live process uses (a crashed run's)")
    cleaning.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    for p in (listing, cleaning):
        p.add_argument("--dir", default=None, help="the folder (default: $CONCURRENT_KV_SHM_DIR or /dev/shm)")
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{seconds:.0f} s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _owner(pid: int, alive: bool) -> str:
    return f"{pid} {'alive' if alive else 'dead'}" if pid else "-"


def render_listing(listing: shm_inspect.Listing) -> str:
    """``shm list``'s text: a row per pool (grouped by manager), then the other files."""
    managers = {p.manager for p in listing.pools if p.manager}
    lines = [f"{listing.folder}: {_count(len(listing.pools), 'pool')} in {_count(len(managers), 'manager')}, "
             f"{_count(len(listing.others), 'other file')}"]
    if listing.pools:
        rows: List[List[object]] = [
            [p.manager[:8] or "-", p.name, _owner(p.owner_pid, p.owner_alive), len(p.workers), _size(p.size),
             _age(p.age_s), f"{p.live}/{p.capacity}", p.pinned, f"{p.hit_rate:.1%}", p.state]
            for p in listing.pools
        ]
        header = ["manager", "pool", "owner", "workers", "size", "age", "used", "pinned", "hit rate", "state"]
        lines += ["", format_table(rows, header)]
    if listing.others:
        rows = [[f.name, _size(f.size), _owner(f.owner_pid, f.owner_alive), "yes" if f.in_use else "no",
                 f.problem or f"{f.kind} segment"] for f in listing.others]
        lines += ["", format_table(rows, ["file", "size", "owner", "mapped", "what"])]
    return "\n".join(lines)


def render_clean(report: shm_inspect.CleanReport, dry_run: bool) -> str:
    """``shm clean``'s text: what went (or would go), what stayed and why."""
    verb = "would remove" if dry_run else "removed"
    lines = [f"{report.folder}: {verb} {_count(len(report.removed), 'file')} ({_size(report.freed_bytes)}), "
             f"kept {len(report.kept)}"]
    lines += [f"  {verb}: {name}" for name in report.removed]
    lines += [f"  kept: {name}: {why}" for name, why in report.kept]
    return "\n".join(lines)


def _shm(args: argparse.Namespace) -> int:
    try:
        return _shm_command(args)
    except OSError as exc:  # no such folder, or one we may not read
        print(f"concurrent-kv shm {args.shm_command}: {exc}", file=sys.stderr)
        return 2


def _shm_command(args: argparse.Namespace) -> int:
    if args.shm_command == "list":
        listing = shm_inspect.scan(args.dir)
        print(json.dumps(dataclasses.asdict(listing), indent=1) if args.json else render_listing(listing))
    else:
        report = shm_inspect.clean(args.dir, dry_run=args.dry_run)
        print(json.dumps(dataclasses.asdict(report), indent=1) if args.json else render_clean(report, args.dry_run))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if hasattr(args, "handler"):  # a subcommand that runs itself (collect)
        return args.handler(args)
    if args.command == "shm":
        return _shm(args)
    return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    cfg = WorkloadConfig(
        env_num=args.envs,
        collectors=args.collectors,
        num_simulations=args.simulations,
        steps=args.steps,
        episode_length=args.episode_length,
        num_layers=args.layers,
        num_heads=args.heads,
        context_length=args.context,
        head_dim=args.head_dim,
        recur_clear=args.recur_clear,
        shared_keys=args.shared_keys if args.shared_keys is not None else (0.25 if args.processes else 0.0),
        seed=args.seed,
    )
    shared = args.processes > 0
    with make_manager(cfg, lock=args.lock, shared=shared) as manager:
        bar = None if args.no_progress else ProgressBar(cfg.env_num * cfg.steps)
        if shared:
            on_progress = None if bar is None else (lambda done: bar.advance(done - bar.done) if done > bar.done else None)
            result = run_processes(manager, cfg, args.processes, args.start_method, on_progress)
        else:
            result = run_collectors(manager, cfg, on_step=None if bar is None else bar.advance)
        if bar is not None and bar.done < bar.total:
            bar.advance(bar.total - bar.done)
        manager.check()
        print(report(manager, cfg, result, args.processes))
    return 0 if result.all_hits_verified else 1


if __name__ == "__main__":
    sys.exit(main())
