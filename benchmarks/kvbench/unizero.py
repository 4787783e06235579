"""The unizero section: LightZero 0.2.0's own KV caches against concurrent_kv's batched seam,
inside the real UniZero world model, per ``initial_inference`` and ``recurrent_inference`` call.

It needs the LightZero environment (elsewhere the section reports itself skipped)::

    PYTHONPATH=. .venv-lightzero/bin/python -m benchmarks.kvbench --only unizero

One world model per size, attached in mode "new". Both modes' cache structures stay on it and
are swapped in per env step without clearing either (a mode switch would empty the caches and
make every root lookup miss): every step runs in both modes, in alternating order, on the same
inputs, and their outputs are compared bit for bit. Per call: its time, the time spent inside
the cache seam (LightZero's ``retrieve_or_generate_kvcache``, ``trim_and_pad_kv_cache``,
``update_cache_context``, ``custom_copy_kv_cache_to_shared_wm``, the root loop's key hashing and
dict lookups, the per-search clear; or ours in their place; outermost call only), as the
project's first measurement of LightZero's cache cost did, and in a separate untimed pass the
aten ops the seam issues (a TorchDispatchMode active inside the seam functions only).
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .results import Row, Rows
from .settings import Settings, Task

LEGACY, OURS = "lightzero", "concurrent_kv"
#: torch's own intra-op thread count, read before the command line sets 1 for the other sections.
DEFAULT_THREADS = torch.get_num_threads()
MODES = (LEGACY, OURS)
CALLS = ("initial", "recurrent")
#: The world model's methods that make up its cache seam (ours replace them in mode "new").
SEAM_METHODS = ("retrieve_or_generate_kvcache", "trim_and_pad_kv_cache", "update_cache_context",
                "custom_copy_kv_cache_to_shared_wm")
#: What else differs between the modes (installed as they are).
SEAM_STRUCTURES = ("shared_pool_init_infer", "shared_pool_recur_infer", "shared_pool_wm",
                   "custom_copy_kv_cache_to_shared_init_envs", "custom_copy_kv_cache_to_shared_recur")


@dataclass(frozen=True)
class ModelSize:
    """A UniZero world model's shape and its search: ``sims`` recurrent calls per env step."""

    name: str
    embed_dim: int
    num_heads: int
    num_layers: int
    context_length: int
    env_num: int
    sims: int


MODELS = (
    ModelSize("atari", 768, 8, 2, 8, 8, 25),
    ModelSize("cartpole", 64, 2, 2, 8, 3, 8),
)

NOTES = [
    "unizero: the real LightZero 0.2.0 world model (vector observations), both modes on one model, swapped per env "
    "step without clearing, in alternating order; p50 of every call after 2 warm-up steps; time ratio = the median "
    "over calls of ours / LightZero's for the same call of the same step (about a second apart); seam = time inside the "
    "cache seam functions (outermost call); share = total seam time / total call time; ops = aten ops issued inside "
    "the seam per call (TorchDispatchMode, a separate pass).",
]


# -- measuring inside the seam ----------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    def __init__(self, meter: "SeamMeter") -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.meter.ops += 1
        return func(*args, **(kwargs or {}))


class SeamMeter:
    """Nanoseconds (and, while ``counting``, aten ops) spent inside the cache seam: each wrapped
    function counts only as the outermost seam call, so nested ones are not counted twice."""

    def __init__(self) -> None:
        self.ns = 0
        self.ops = 0
        self.counting = False
        self._depth = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def measured(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth = 1
            mode = _OpCounter(self) if self.counting else contextlib.nullcontext()
            start = time.perf_counter_ns()
            try:
                with mode:
                    return fn(*args, **kwargs)
            finally:
                self.ns += time.perf_counter_ns() - start
                self._depth = 0
        return measured

    def take(self) -> Tuple[int, int]:
        """(ns, ops) since the last take."""
        out = (self.ns, self.ops)
        self.ns = self.ops = 0
        return out


class _MeteredMap:
    """A world-model key -> slot dict (LightZero's or ours) whose lookups, stores and clears
    count as seam time."""

    def __init__(self, inner: Any, meter: SeamMeter) -> None:
        self._inner = inner
        self.get = meter.wrap(inner.get)
        self.clear = meter.wrap(inner.clear)
        self._set = meter.wrap(inner.__setitem__)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._set(key, value)

    def __getitem__(self, key: Any) -> Any:
        return self._inner[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._inner

    def __len__(self) -> int:
        return len(self._inner)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._inner)


class TwoModes:
    """Both modes' cache structures on one world model, metered, swapped in without clearing."""

    def __init__(self, model: Any, meter: SeamMeter) -> None:
        from concurrent_kv.integrations.lightzero import attach

        self.wm = model.world_model
        self.adapter = attach(self.wm, mode="original")
        self.modes = {LEGACY: self._capture(meter)}
        self.adapter.set_mode("new")
        self.modes[OURS] = self._capture(meter)

    def _capture(self, meter: SeamMeter) -> Dict[str, Any]:
        wm = self.wm
        out: Dict[str, Any] = {name: meter.wrap(getattr(wm, name)) for name in SEAM_METHODS}
        out.update({name: getattr(wm, name) for name in SEAM_STRUCTURES})
        out["past_kv_cache_init_infer_envs"] = [_MeteredMap(d, meter) for d in wm.past_kv_cache_init_infer_envs]
        out["past_kv_cache_recurrent_infer"] = _MeteredMap(wm.past_kv_cache_recurrent_infer, meter)
        return out

    def use(self, mode: str) -> None:
        self.wm.__dict__.update(self.modes[mode])

    def close(self) -> None:
        self.use(OURS)
        self.adapter.close()


@contextlib.contextmanager
def metered_hash(world_model: Any, meter: SeamMeter) -> Iterator[None]:
    """Count the root loop's key hashing (LightZero calls its module's ``hash_state`` inline)."""
    module = sys.modules[type(world_model).__module__]
    original = getattr(module, "hash_state")
    setattr(module, "hash_state", meter.wrap(original))
    try:
        yield
    finally:
        setattr(module, "hash_state", original)


# -- driving the model as MCTS does -------------------------------------------------------------


class Search:
    """One env step of every env: ``initial_inference``, then ``sims`` recurrent calls on a
    seeded tree (deepest expandable node 60 % of the time, any other 40 %), as UniZero's MCTS
    calls the model. The same step gives the same calls in either mode."""

    def __init__(self, model: Any, size: ModelSize, obs_dim: int, actions: int) -> None:
        self.model, self.size, self.actions = model, size, actions
        rng = np.random.RandomState(0)
        self._obs = lambda: torch.from_numpy(rng.randn(size.env_num, obs_dim).astype(np.float32))
        self.last_obs = torch.zeros(size.env_num, obs_dim)
        self.last_action = [-1] * size.env_num
        self.cur_obs = self._obs()
        self.timestep = np.zeros(size.env_num, dtype=np.int64)
        self.step_no = 0

    def run(self, on_call: Callable[[str, int], None]) -> List[torch.Tensor]:
        """The step's calls; ``on_call(kind, ns)`` after each; every output tensor, in order."""
        model, envs = self.model, self.size.env_num
        with torch.no_grad():
            start = time.perf_counter_ns()
            out = model.initial_inference(self.last_obs, self.last_action, self.cur_obs, self.timestep)
            on_call("initial", time.perf_counter_ns() - start)
        outputs = [out.latent_state, out.value, out.policy_logits]
        root = out.latent_state.cpu().numpy()
        nodes: List[List[Tuple[np.ndarray, int]]] = [[(root[b], 0)] for b in range(envs)]
        children: List[List[int]] = [[0] for _ in range(envs)]
        rng = np.random.RandomState(1000 + self.step_no)
        history = []
        for sim in range(self.size.sims):
            parents, actions, depths = [], [], []
            for b in range(envs):
                free = [i for i in range(len(nodes[b])) if children[b][i] < self.actions]
                i = free[-1] if rng.rand() < 0.6 else free[rng.randint(len(free))]
                parents.append(nodes[b][i][0])
                actions.append(children[b][i])
                depths.append(nodes[b][i][1] + 1)
                children[b][i] += 1
            history.append((np.asarray(parents), torch.from_numpy(np.asarray(actions)).long()))
            with torch.no_grad():
                start = time.perf_counter_ns()
                rec = model.recurrent_inference(history, sim, depths, self.timestep)
                on_call("recurrent", time.perf_counter_ns() - start)
            outputs += [rec.latent_state, rec.reward, rec.value, rec.policy_logits]
            new = rec.latent_state.cpu().numpy()
            for b in range(envs):
                nodes[b].append((new[b], depths[b]))
                children[b].append(0)
        return [o.clone() for o in outputs]

    def advance(self, outputs: List[torch.Tensor]) -> None:
        """The next step's inputs: an action from the root policy, a new observation."""
        policy = outputs[2]
        self.last_obs, self.cur_obs = self.cur_obs, self._obs()
        self.last_action = [(int(a) + self.step_no + b) % self.actions for b, a in enumerate(policy.argmax(-1).tolist())]
        self.timestep = self.timestep + 1
        self.step_no += 1


# -- the measurement ------------------------------------------------------------------------------


def build(size: ModelSize) -> Tuple[Any, int, int]:
    """The seeded UniZero model of ``size`` (tests/lightzero's builder), its obs size and actions."""
    from tests.lightzero import unizero_small

    model = unizero_small.build_model(
        seed=0, embed_dim=size.embed_dim, num_heads=size.num_heads, num_layers=size.num_layers,
        context_length=size.context_length, context_length_for_recurrent=size.context_length,
        env_num=size.env_num, num_simulations=size.sims)
    return model, unizero_small.OBS_DIM, unizero_small.ACTIONS


def measure(size: ModelSize, threads: int, steps: int, count_steps: int) -> Rows:
    """Per-call times of both modes over ``steps`` measured env steps (after 2 warm-up steps),
    then the seam's aten ops over ``count_steps`` more; one row per (mode, call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or DEFAULT_THREADS)
    model, obs_dim, actions = build(size)
    meter = SeamMeter()
    both = TwoModes(model, meter)
    search = Search(model, size, obs_dim, actions)
    times: Dict[Tuple[str, str], List[Tuple[int, int, int]]] = {(m, c): [] for m in MODES for c in CALLS}
    mismatches = 0
    try:
        with metered_hash(both.wm, meter):
            for step in range(2 + steps + count_steps):
                meter.counting = step >= 2 + steps
                keep = step >= 2
                results = []
                for mode in (MODES if step % 2 == 0 else MODES[::-1]):
                    both.use(mode)
                    meter.take()

                    def on_call(kind: str, ns: int, mode: str = mode) -> None:
                        seam_ns, ops = meter.take()
                        if keep:
                            times[(mode, kind)].append((ns, seam_ns, ops) if not meter.counting else (-1, -1, ops))
                    results.append(search.run(on_call))
                mismatches += sum(not torch.equal(a, b) for a, b in zip(*results))
                search.advance(results[0])
    finally:
        both.close()
        torch.set_num_threads(before)
    rows = [_row(size, threads, mode, call, times[(mode, call)], mismatches) for mode in MODES for call in CALLS]
    for row in rows:
        if row["mode"] == OURS:  # the same call of the same step, run a few ms apart in either mode
            row["paired_ratio"] = _paired_ratio(times[(OURS, row["call"])], times[(LEGACY, row["call"])])
    return rows


def _row(size: ModelSize, threads: int, mode: str, call: str, samples: List[Tuple[int, int, int]],
         mismatches: int) -> Row:
    timed = [(ns, seam) for ns, seam, _ in samples if ns >= 0]
    counted = [ops for ns, _, ops in samples if ns < 0]
    total, seam_total = sum(ns for ns, _ in timed), sum(seam for _, seam in timed)
    return {
        "model": size.name, "threads": threads or DEFAULT_THREADS, "mode": mode, "call": call,
        "n": len(timed), "p50_us": statistics.median(ns for ns, _ in timed) / 1000,
        "seam_p50_us": statistics.median(seam for _, seam in timed) / 1000,
        "seam_share": seam_total / total if total else None,
        "ops_per_call": sum(counted) / len(counted) if counted else None,
        "output_mismatches": mismatches,
    }


def _paired_ratio(ours: List[Tuple[int, int, int]], legacy: List[Tuple[int, int, int]]) -> Optional[float]:
    """The median over calls of ours / LightZero's time for the same call (same step, same
    simulation): robust to the machine slowing down and speeding up over the run."""
    ratios = [a[0] / b[0] for a, b in zip(ours, legacy) if a[0] > 0 and b[0] > 0]
    return statistics.median(ratios) if ratios else None


def compare(rows: Rows) -> Rows:
    """Per model, threads and call: ours against LightZero's (time ratio: the median of paired
    calls' ratios, % faster)."""
    out = []
    for legacy in (r for r in rows if r["mode"] == LEGACY):
        ours = next((r for r in rows if r["mode"] == OURS and all(
            r[k] == legacy[k] for k in ("model", "threads", "call"))), None)
        if ours is None:
            continue
        ratio = ours.get("paired_ratio") or ours["p50_us"] / legacy["p50_us"]
        out.append({"model": legacy["model"], "threads": legacy["threads"], "call": legacy["call"],
                    "lightzero_p50_us": legacy["p50_us"], "ours_p50_us": ours["p50_us"], "time_ratio": ratio,
                    "faster_pct": 100 * (1 - ratio), "lightzero_share": legacy["seam_share"],
                    "ours_share": ours["seam_share"], "lightzero_ops": legacy["ops_per_call"],
                    "ours_ops": ours["ops_per_call"]})
    return out


def _available() -> Optional[str]:
    if importlib.util.find_spec("lzero") is None:
        return "needs lightzero 0.2.0: run with .venv-lightzero/bin/python"
    return None


def _task(size: ModelSize, threads: int, s: Settings) -> Callable[[], Rows]:
    def run() -> Rows:
        skipped = _available()
        if skipped:
            return [{"model": size.name, "threads": threads, "skipped": skipped}]
        steps = max(1, -(-s.unizero_calls // size.sims))
        return measure(size, threads, steps, count_steps=1)
    return run


def unizero_tasks(s: Settings) -> List[Task]:
    return [Task("unizero", "calls", f"unizero {size.name}, {threads or 'default'} thread(s)", _task(size, threads, s))
            for size in MODELS for threads in s.unizero_threads]


def summarize_unizero(section: Dict[str, Rows]) -> None:
    rows = [r for r in section.get("calls", []) if "skipped" not in r]
    if rows:
        section["compare"] = compare(rows)
