"""What is measured: entry sizes, policies, backends, the sections, how much of each (the full
run, ``--quick``, the presets) and the task record every section hands to the runner."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from concurrent_kv import EntrySpec

from .names import Impl

SIZES: Dict[str, EntrySpec] = {
    "8KiB": EntrySpec(2, 1, 2, 8, 32),  # CartPole
    "96KiB": EntrySpec(2, 1, 8, 8, 96),  # Atari default
    "1.27MiB": EntrySpec(4, 1, 4, 162, 64),  # Memory env
}
POLICIES = ("fifo", "lru", "priority")
BACKENDS = ("rw", "mutex", "shared")  # in-process pools by lock kind, and a shared-memory pool
HOT = 7  # the key every hit measurement reads
MISS_KEY = 2**63 + 12345  # never stored

#: Sections of the default run, in run order; then those only --only or a preset asks for.
DEFAULT_SECTIONS = ("micro", "baselines", "trace", "memory", "hitrate")
#: ``unizero`` runs LightZero's real world model: only in the LightZero environment, on request.
SECTIONS = DEFAULT_SECTIONS + ("threads", "scaling", "unizero")


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or ``--quick``; presets change a few fields."""

    quick: bool
    micro_sizes: Tuple[str, ...]
    calls: Dict[str, int]  # per-call timings per measurement, by entry size
    slots: int  # pool capacity in micro / baselines (UniZero's recur pool for 8 envs x 25 sims)
    xproc_calls: int  # calls per cross-process measurement
    trace_steps: int  # env steps per env per trace run
    trace_sims: Tuple[int, ...]
    trace_threads: Tuple[int, ...]
    trace_processes: Tuple[Tuple[int, int], ...]  # (processes, threads per process)
    trace_locks: Tuple[str, ...]
    trace_repeats: int  # repeats of the runs the goals compare (median taken)
    micro_repeats: int  # rounds of micro measurements, spread over the run (lowest p50 kept)
    alloc_ops: int  # operations per allocation count
    hitrate_steps: int
    policies: Tuple[str, ...] = POLICIES  # micro
    backends: Tuple[str, ...] = BACKENDS  # micro and memory
    baselines: Tuple[str, ...] = Impl.ALL
    threads_calls: int = 20000  # calls per thread (threads section)
    scaling_seconds: float = 3.0  # per shared-pool throughput run (scaling section)
    scaling_steps: int = 30  # env steps per env of its trace runs
    unizero_calls: int = 300  # recurrent calls per mode and model (unizero section)
    unizero_threads: Tuple[int, ...] = (1, 0)  # torch intra-op threads (0: torch's default)

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick=True, micro_sizes=("96KiB",), calls=dict.fromkeys(SIZES, 500), slots=200,
                       xproc_calls=40, trace_steps=10, trace_sims=(25,), trace_threads=(1, 2),
                       trace_processes=((1, 1),), trace_locks=("rw", "mutex"), trace_repeats=1, micro_repeats=1,
                       alloc_ops=1000, hitrate_steps=10, threads_calls=2000, scaling_seconds=0.5, scaling_steps=5,
                       unizero_calls=25, unizero_threads=(1,))
        return cls(quick=False, micro_sizes=tuple(SIZES), calls={"8KiB": 3000, "96KiB": 3000, "1.27MiB": 800},
                   slots=200, xproc_calls=200, trace_steps=50, trace_sims=(25, 50), trace_threads=(1, 2, 4),
                   trace_processes=((1, 1), (1, 2), (2, 1)), trace_locks=("rw", "mutex"), trace_repeats=5,
                   micro_repeats=3, alloc_ops=10_000, hitrate_steps=40)

    def but(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    """A focused run: some sections, with settings changed for them."""

    sections: Tuple[str, ...]
    help: str
    changes: Callable[[bool], Dict[str, Any]]  # Settings fields, given --quick


def _pool_ops(quick: bool) -> Dict[str, Any]:
    return {"micro_sizes": ("96KiB",), "calls": dict.fromkeys(SIZES, 500 if quick else 3000), "slots": 400,
            "policies": ("fifo",), "backends": ("rw", "mutex"), "micro_repeats": 1}


def _shared(quick: bool) -> Dict[str, Any]:
    return {"micro_sizes": ("96KiB",) if quick else tuple(SIZES), "calls": dict.fromkeys(SIZES, 300 if quick else 3000),
            "slots": 64, "policies": ("fifo",), "backends": ("rw", "shared"), "micro_repeats": 1,
            "baselines": (Impl.MANAGER_DICT, Impl.TORCH_QUEUE), "xproc_calls": 50 if quick else 300}


def _threads(quick: bool) -> Dict[str, Any]:
    return {"micro_sizes": ("96KiB",)}


PRESETS: Dict[str, Preset] = {
    "pool-ops": Preset(("micro",), "pool get/set per lock kind against copy_ (96 KiB, 400 slots, fifo)", _pool_ops),
    "shared": Preset(("micro", "baselines", "scaling"), "shared pool vs in-process, Manager dict, torch queue; "
                     "1 vs 2 processes", _shared),
    "threads": Preset(("threads",), "2 threads vs 1 on one pool and on a pool each: the GIL ceiling", _threads),
}


@dataclass
class Task:
    """One measurement: ``run()`` returns rows for ``results[section][table]``."""

    section: str
    table: str
    label: str
    run: Callable[[], Any]
