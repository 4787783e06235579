"""The command line: ``python -m benchmarks.kvbench [--quick] [--only SECTION ...] [--preset NAME]
[--out DIR]``, run from the repository root."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from . import __doc__ as PACKAGE_DOC
from .plots import write_plots
from .report import print_goals, print_notes, print_tables, write_json, write_markdown
from .results import Results
from .runner import build_tasks, run_tasks, summarize
from .settings import DEFAULT_SECTIONS, PRESETS, SECTIONS, SIZES, Settings
from .timing import Stopwatch, timer_overhead_us


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kvbench", description=PACKAGE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer calls, 96 KiB only, short traces")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                       help=f"sections to run: {', '.join(SECTIONS)} (default: {', '.join(DEFAULT_SECTIONS)})")
    which.add_argument("--preset", choices=sorted(PRESETS),
                       help="; ".join(f"{name}: {preset.help}" for name, preset in PRESETS.items()))
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), help="entry sizes (default: the run's own)")
    p.add_argument("--calls", type=int, help="calls per latency measurement, every size (default: the run's own)")
    p.add_argument("--out", type=Path, help="results folder (default results/<run>-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no line per measurement on stderr")
    return p


def choose(args: argparse.Namespace) -> Tuple[Settings, Tuple[str, ...], str]:
    """The settings, the sections and the run's name, from the command line."""
    settings = Settings.make(args.quick)
    sections: Tuple[str, ...] = tuple(args.only or DEFAULT_SECTIONS)
    name = "quick" if args.quick else "full"
    if args.preset:
        preset = PRESETS[args.preset]
        settings, sections = settings.but(**preset.changes(args.quick)), preset.sections
        name = f"{args.preset}{' quick' if args.quick else ''}"
    if args.sizes:
        settings = settings.but(micro_sizes=tuple(args.sizes))
    if args.calls:
        settings = settings.but(calls=dict.fromkeys(SIZES, args.calls))
    return settings, sections, name


def meta(settings: Settings, sections: Sequence[str], name: str, preset: Optional[str]) -> Dict[str, Any]:
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "run": name, "quick": settings.quick,
            "preset": preset, "sections": list(sections), "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.platform(),
            "torch_threads": 1, "timer_overhead_us": timer_overhead_us(), "settings": dict(settings.__dict__)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    settings, sections, name = choose(args)
    out: Path = args.out or Path("results") / f"{name.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the workload does the same; copies are small, threads are the parallelism
    with Stopwatch() as sw:
        results: Results = {"meta": meta(settings, sections, name, args.preset)}
        print(f"concurrent_kv benchmark ({name}): {', '.join(sections)}; torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, 1 intra-op thread; results -> {out}")
        run_tasks(build_tasks(settings, sections), results, not args.no_progress)
        summarize(results)
    results["meta"]["runtime_s"] = sw.elapsed_s
    print_tables(results)
    results["meta"]["plots"] = write_plots(results, out)
    write_json(results, out / "results.json")
    write_markdown(results, out / "results.md")
    if args.preset is None:
        print_notes(results)
    print_goals(results, skip_unmeasured=args.preset is not None)
    plots = results["meta"]["plots"]
    print(f"\nruntime {sw.elapsed_s:.1f} s; wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f", {len(plots)} plots" if plots else ""))
    return 0
