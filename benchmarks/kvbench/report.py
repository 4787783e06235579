"""What a run leaves behind: the tables (console and ``results.md``), the notes, the goals
check on the console, and ``results.json``. Plots are in ``plots``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Sequence, Tuple

from .names import Prio
from .results import Results, Row, table

Column = Tuple[Any, ...]  # (key, header) or (key, header, decimals)
LATENCY: List[Column] = [("p50_us", "p50 us"), ("p99_us", "p99 us"), ("ops_per_s", "ops/s")]


class Table(NamedTuple):
    title: str
    note: str
    rows: Sequence[Row]
    columns: Sequence[Column]


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if abs(x) >= 10000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        return f"{x:.{digits}f}"
    return str(x)


def cells(rows: Sequence[Row], cols: Sequence[Column]) -> List[List[str]]:
    return [[fmt(r.get(c[0]), *c[2:]) for c in cols] for r in rows]


def text_table(rows: List[List[str]], header: List[str], left: bool = False) -> str:
    """A plain aligned text table (numbers right-aligned, or every column left with ``left``)."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(x.ljust(w) if left else x.rjust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _micro(results: Results) -> List[Table]:
    return [
        Table("micro: floor", "one copy_ into a preallocated tensor; clone = a copy into a new one",
              table(results, "micro", "floor"), [("size", "size"), ("op", "op"), *LATENCY]),
        Table("micro: pool operations", "x floor and us above floor against copy_ of the same bytes",
              table(results, "micro", "ops"), [("size", "size"), ("policy", "policy"), ("backend", "backend"),
                                               ("op", "op"), *LATENCY, ("x_floor", "x floor"),
                                               ("over_floor_us", "+us over floor")]),
    ]


def _baselines(results: Results) -> List[Table]:
    impl: List[Column] = [("size", "size"), ("impl", "impl"), ("op", "op"), *LATENCY, ("skipped", "skipped")]
    return [
        Table("baselines: in-process", "legacy get includes the world model's copy into staging",
              table(results, "baselines", "in_process"), impl),
        Table("baselines: across processes", "", table(results, "baselines", "cross_process"), impl),
        Table("baselines: shared pool vs cross-process (x faster, p50)", "",
              table(results, "baselines", "shared_vs_cross_process"),
              [("size", "size"), ("shared_get_us", "shared get(out=) us"), ("shared_set_us", "shared set us"),
               ("x_vs_manager_dict_get", "x Manager dict get"), ("x_vs_manager_dict_set", "x Manager dict set"),
               ("x_vs_torch_queue", "x torch queue"), ("x_vs_ray_put_get", "x Ray put+get")]),
    ]


def _trace(results: Results) -> List[Table]:
    return [
        Table("trace: UniZero workload, 8 envs",
              "median of repeats; 'cache only' = no payload fill/verify in either; a recurrent call = 8 reads "
              "+ 8 writes of one simulation, time = elapsed / (steps x sims)",
              table(results, "trace", "table"),
              [("checks", "checks"), ("sims", "sims"), ("variant", "variant"), ("processes", "procs"),
               ("threads", "threads"), ("lock", "lock"), ("recur_clear", "recur clear"), ("repeats", "reps"),
               ("env_steps_per_s", "env steps/s"), ("ops_per_s", "cache ops/s"),
               ("us_per_recurrent_call", "us/recurrent call"), ("verified", "verified"), ("hits", "hits")]),
        Table("trace: ratios", "median and range of the ratios of runs made side by side (interleaved)",
              table(results, "trace", "ratios"),
              [("checks", "checks"), ("sims", "sims"), ("lock", "lock"), ("comparison", "comparison"),
               ("value", "median", 3), ("min", "min", 3), ("max", "max", 3), ("pairs", "pairs"),
               ("same_op_sequence", "same op sequence")]),
    ]


def _memory(results: Results) -> List[Table]:
    return [
        Table("memory: footprint", "", table(results, "memory", "footprint"),
              [("size", "size"), ("backend", "backend"), ("slots", "slots"), ("entry_bytes", "entry B"),
               ("storage_bytes", "storage B"), ("metadata_per_slot", "metadata B/slot"), ("how", "how")]),
        Table("memory: allocations per operation, steady state", "", table(results, "memory", "allocations"),
              [("backend", "backend"), ("op", "op"), ("tensor_storages_per_op", "tensor storages/op"),
               ("net_py_blocks_per_op", "net Python blocks/op", 4), ("transient_peak_bytes", "transient peak B"),
               ("aten_calls_per_op", "aten calls/op")]),
    ]


def _unizero(results: Results) -> List[Table]:
    return [
        Table("unizero: per call, LightZero 0.2.0's world model",
              "p50 of each call; seam = time inside the cache seam (p50), share = its total / the calls' total; "
              "ops = aten ops the seam issues per call; mismatches = output tensors differing between the modes",
              table(results, "unizero", "calls"),
              [("model", "model"), ("threads", "threads"), ("mode", "mode"), ("call", "call"), ("n", "n"),
               ("p50_us", "p50 us"), ("seam_p50_us", "seam p50 us"), ("seam_share", "seam share", 4),
               ("ops_per_call", "ops/call", 1), ("output_mismatches", "mismatches"), ("skipped", "skipped")]),
        Table("unizero: concurrent_kv against LightZero's own caches",
              "time ratio = median over calls of ours / LightZero's time for the same call of the same step",
              table(results, "unizero", "compare"),
              [("model", "model"), ("threads", "threads"), ("call", "call"), ("lightzero_p50_us", "LightZero us"),
               ("ours_p50_us", "ours us"), ("time_ratio", "time ratio", 3), ("faster_pct", "% faster", 1),
               ("lightzero_share", "LightZero share", 4), ("ours_share", "our share", 4),
               ("lightzero_ops", "LightZero ops", 0), ("ours_ops", "our ops", 0)]),
    ]


def _hitrate(results: Results) -> List[Table]:
    return [Table("hitrate: recur pool reads", "priority (-depth): deepest evicted first; priority (search, "
                  "-depth): older searches first, then deepest; belady: offline optimum",
                  table(results, "hitrate", "rows"),
                  [("recur_clear", "recur clear"), ("reads", "reads"), ("capacity_frac", "capacity x sims*envs"),
                   ("capacity", "slots"), ("fifo", "fifo"), ("lru", "lru"), (Prio.DEPTH, "prio -depth"),
                   (Prio.SEARCH_DEPTH, "prio search,-depth"), ("belady", "belady")])]


def _threads(results: Results) -> List[Table]:
    return [Table("threads: 2 threads vs 1 (the GIL ceiling)",
                  "x = 2 threads' total calls/s / 1 thread's; 'own pools' has no lock in common",
                  table(results, "threads", "rows"),
                  [("size", "size"), ("op", "op"), ("lock", "lock"), ("one_thread_calls_per_s", "1 thread calls/s"),
                   ("x_two_threads_one_pool", "x 2 threads, one pool"),
                   ("x_two_threads_own_pools", "x 2 threads, own pools")])]


def _scaling(results: Results) -> List[Table]:
    return [
        Table("scaling: one shared pool, 50% get(out=) / 50% set", "", table(results, "scaling", "throughput"),
              [("size", "size"), ("processes", "procs"), ("seconds", "s"), ("ops_per_s", "ops/s")]),
        Table("scaling: UniZero trace, 2 collectors, shared_keys 0.25", "", table(results, "scaling", "trace"),
              [("processes", "procs"), ("threads", "threads"), ("env_steps_per_s", "env steps/s"),
               ("verified", "verified"), ("hits", "hits"), ("corrupt", "corrupt"), ("startup_s", "startup s")]),
        Table("scaling: 2 processes / 1", "", table(results, "scaling", "ratios"),
              [("measure", "measure"), ("one_process", "1 process"), ("two_processes", "2 processes"),
               ("x", "x", 2)]),
    ]


_SECTION_TABLES: List[Tuple[str, Callable[[Results], List[Table]]]] = [
    ("micro", _micro), ("baselines", _baselines), ("trace", _trace), ("memory", _memory), ("hitrate", _hitrate),
    ("threads", _threads), ("scaling", _scaling), ("unizero", _unizero)]


def tables(results: Results) -> List[Table]:
    """Every table that has rows, then the goals."""
    out = [t for section, make in _SECTION_TABLES if results.get(section) for t in make(results) if t.rows]
    out.append(Table("goals", "measured on this machine in this run; nothing asserted", results.get("goals", []),
                     [("goal", "goal"), ("measured", "measured", 3), ("unit", "unit"), ("target", "target"),
                      ("status", "status"), ("note", "note")]))
    return out


def md_table(rows: Sequence[Row], cols: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in cells(rows, cols)]
    return "\n".join(lines)


def write_markdown(results: Results, path: Path) -> None:
    meta = results["meta"]
    parts = [f"# concurrent_kv benchmark ({meta['run']})", "",
             f"{meta['started']}; torch {meta['torch']}, Python {meta['python']}, {meta['cpus']} CPUs, "
             f"{meta['machine']}; runtime {meta.get('runtime_s', 0):.0f} s; timer overhead "
             f"{meta['timer_overhead_us']:.3f} us per timed call (not subtracted)", "", "## Notes", ""]
    parts += [f"* {note}" for note in results.get("notes", [])] + [""]
    for t in tables(results):
        parts += [f"## {t.title}", ""] + ([t.note, ""] if t.note else []) + [md_table(t.rows, t.columns), ""]
    path.write_text("\n".join(parts))


def write_json(results: Results, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, default=str))


def print_tables(results: Results) -> None:
    for t in tables(results):
        if t.title == "goals":
            continue
        print(f"\n== {t.title} ==" + (f"  ({t.note})" if t.note else ""))
        print(text_table(cells(t.rows, t.columns), [c[1] for c in t.columns]))


def print_notes(results: Results) -> None:
    print("\n== notes ==")
    for note in results.get("notes", []):
        print(f"* {note}")


def print_goals(results: Results, skip_unmeasured: bool = False) -> None:
    """The goals check; ``skip_unmeasured`` leaves out goals whose section did not run."""
    goals = [g for g in results["goals"] if not (skip_unmeasured and g["measured"] is None)]
    if not goals:
        return
    print("\n== goals (measured on this machine, this run; never asserted) ==")
    rows = [[g["goal"], fmt(g["measured"], 3) + (f" {g['unit']}" if g["measured"] is not None else ""), g["target"],
             g["status"] + (f" ({g['note']})" if g["note"] else "")] for g in goals]
    print(text_table(rows, ["goal", "measured", "target", "status"], left=True))
