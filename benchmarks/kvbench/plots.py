"""PNG plots of a run (matplotlib, from the ``bench`` extra): micro operations against the floor
per size, trace throughput by threads against the legacy model, hit rates by capacity."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence

from .hitrate import POLICY_COLUMNS
from .names import Checks, Op, Variant
from .results import Results, find, table
from .settings import BACKENDS, SIZES


def _save(plt: Any, fig: Any, axes: Sequence[Any], out: Path, name: str, **legend: Any) -> str:
    """Legends, layout, ``out/name`` written, the figure closed; the file name."""
    for ax in axes:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _micro(plt: Any, results: Results, out: Path) -> List[str]:
    written = []
    ops = table(results, "micro", "ops")
    for size in sorted({r["size"] for r in ops}, key=list(SIZES).index):
        rows = [r for r in ops if r["size"] == size and r["policy"] == "fifo"]
        names = list(dict.fromkeys(r["op"] for r in rows))
        backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            vals = [(find(rows, backend=backend, op=o) or {}).get("p50_us", 0) for o in names]
            ax.bar([x + i * width for x in range(len(names))], vals, width, label=backend)
        floor = find(table(results, "micro", "floor"), size=size, op=Op.COPY)
        if floor:
            ax.axhline(floor["p50_us"], color="k", linestyle="--", label="copy_ floor")
        ax.set_xticks([x + width for x in range(len(names))], names, rotation=20, ha="right")
        ax.set_ylabel("p50 us")
        ax.set_title(f"pool operations, {size}, fifo")
        written.append(_save(plt, fig, [ax], out, f"micro_{size}.png"))
    return written


def _trace(plt: Any, results: Results, out: Path) -> List[str]:
    rows = table(results, "trace", "table")
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for checks in Checks.BOTH:
        for lock in ("rw", "mutex"):
            pts = sorted((r["threads"], r["env_steps_per_s"]) for r in rows
                         if r["variant"] == Variant.OURS and r["sims"] == 25 and r["lock"] == lock
                         and r["checks"] == checks)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"ours {lock} ({checks})")
        legacy = find(rows, variant=Variant.LEGACY, sims=25, checks=checks)
        if legacy:
            cache_only = checks == Checks.CACHE_ONLY
            ax.axhline(legacy["env_steps_per_s"], color="gray" if cache_only else "black",
                       linestyle="--" if cache_only else ":", label=f"legacy 1 thread ({checks})")
    ax.set_xticks(sorted({r["threads"] for r in rows if r["variant"] == Variant.OURS}))
    ax.set_xlabel("collector threads")
    ax.set_ylabel("env steps / s")
    ax.set_title("UniZero trace, 8 envs, 25 sims")
    return [_save(plt, fig, [ax], out, "trace.png", fontsize=8)]


def _hitrate(plt: Any, results: Results, out: Path) -> List[str]:
    rows = table(results, "hitrate", "rows")
    if not rows:
        return []
    modes = sorted({r["recur_clear"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        by_mode = [r for r in rows if r["recur_clear"] == mode]
        for policy in POLICY_COLUMNS:
            ax.plot([r["capacity_frac"] for r in by_mode], [r[policy] for r in by_mode], marker="o", label=policy)
        ax.set_xlabel("capacity / (sims x envs)")
        ax.set_ylabel("recur read hit rate")
        ax.set_title(f"recur_clear={mode}")
    return [_save(plt, fig, axes[0], out, "hitrate.png", fontsize=8)]


def write_plots(results: Results, out: Path) -> List[str]:
    """Every plot whose data this run has, into ``out``; the file names. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib not installed (pip install -e '.[bench]')")
        return []
    return [name for draw in (_micro, _trace, _hitrate) for name in draw(plt, results, out)]
