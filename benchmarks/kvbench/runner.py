"""Running a benchmark: the task list of the chosen sections in run order, the run itself (with a
line per task on stderr), then the summaries, goals and notes every report reads."""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Sequence

from . import baselines, crossproc, hitrate, memory, micro, threads, timing, trace, unizero
from .goals import goals
from .results import Results
from .settings import SECTIONS, Settings, Task
from .timing import Stopwatch

_TASKS: Dict[str, Callable[[Settings], List[Task]]] = {
    "micro": micro.micro_tasks, "baselines": baselines.baseline_tasks, "trace": trace.trace_tasks,
    "memory": memory.memory_tasks, "hitrate": hitrate.hitrate_tasks, "threads": threads.threads_tasks,
    "scaling": crossproc.scaling_tasks, "unizero": unizero.unizero_tasks,
}
#: In the order results.md lists them.
NOTES = (timing.NOTES + micro.NOTES + trace.NOTES + hitrate.NOTES + memory.NOTES + baselines.NOTES + unizero.NOTES)


def build_tasks(s: Settings, only: Sequence[str]) -> List[Task]:
    """Every chosen section's tasks in order; further micro rounds are spread over the rest of the
    run (the last one at its end), so that a transient slowdown of the machine cannot spoil every
    round of one measurement."""
    tasks = [t for name in SECTIONS if name in only for t in _TASKS[name](s)]
    if "micro" not in only or s.micro_repeats < 2:
        return tasks
    first = [t for t in tasks if t.section == "micro"]
    rest = [t for t in tasks if t.section != "micro"]
    out, rounds = list(first), s.micro_repeats - 1
    for round_no in range(1, s.micro_repeats):
        share = rest[(round_no - 1) * len(rest) // rounds: round_no * len(rest) // rounds]
        out += share + micro.micro_tasks(s, round_no)
    return out


def run_tasks(tasks: Sequence[Task], results: Results, progress: bool) -> None:
    """Run every task, adding its rows to ``results[section][table]`` and its time to
    ``meta.section_s``."""
    seconds = results["meta"].setdefault("section_s", {})
    for i, task in enumerate(tasks, 1):
        if progress:
            print(f"[{i:3}/{len(tasks)}] {task.label}", file=sys.stderr, flush=True)
        with Stopwatch() as sw:
            rows = task.run()
        seconds[task.section] = seconds.get(task.section, 0.0) + sw.elapsed_s
        table = results.setdefault(task.section, {}).setdefault(task.table, [])
        table.extend(rows if isinstance(rows, list) else [rows])


def summarize(results: Results) -> None:
    """Derived tables (lowest p50s, ratios), then the goals and the notes."""
    micro.summarize_micro(results.get("micro", {}))
    trace.summarize_trace(results.get("trace", {}))
    baselines.summarize_baselines(results)
    crossproc.summarize_scaling(results.get("scaling", {}))
    unizero.summarize_unizero(results.get("unizero", {}))
    results["goals"] = goals(results)
    results["notes"] = list(NOTES)
