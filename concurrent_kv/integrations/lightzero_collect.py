"""Real LightZero 0.2.0 UniZero collectors, one per worker process: the ``collect`` command's parts.

Each worker builds what LightZero's own training entry builds for collection (see
``lightzero-real-collector.md``): the zoo config compiled by DI-engine, a ``BaseEnvManager`` of zoo
envs, the UniZero policy (learn + collect modes: collect alone fails on its first forward), and
``lzero.worker.MuZeroCollector`` searching with the compiled C++ tree. In the ``"shared"`` phase
the policy's caches go through one shared manager (:func:`~.lightzero.enable` with the
launcher's handle and ``first_env = index * envs``); in the ``"lightzero"`` phase they are
LightZero's own.

LightZero and DI-engine are imported inside the functions: this module (and the command's
parser) loads without them.
"""

from __future__ import annotations

import copy
import math
import os
import time
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..checks import boolean, non_negative_int, positive_int
from ..entry import EntrySpec
from ..errors import ConfigError
from ..manager import KVCacheManager, ManagerHandle
from .lightzero import LightZeroCacheAdapter, enable

__all__ = ["CollectSettings", "ENVS", "PHASES", "LIGHTZERO_INIT_SLOTS", "entry_spec", "shared_manager",
           "randomize_zero_heads", "build_policy", "build_collector", "worker_main",
           "legacy_pool_bytes"]

#: The zoo configs a run can use: name -> (config module, its main and create config names).
ENVS = {"cartpole": ("zoo.classic_control.cartpole.config.cartpole_unizero_config", "main_config", "create_config")}
#: "lightzero": LightZero's own per-process caches; "shared": every collector on one shared manager.
PHASES = ("lightzero", "shared")
#: LightZero 0.2.0's root ring per env (``world_model.py``: ``shared_pool_size_init = int(2)``).
LIGHTZERO_INIT_SLOTS = 2
#: Forwards (batched env steps) each worker runs before the timed part: first-call costs.
WARMUP_FORWARDS = 3


@dataclass(frozen=True)
class CollectSettings:
    """One run of the command; the same for both phases. ``steps`` (total env steps a phase runs,
    split evenly over the collectors) replaces ``seconds`` when given."""

    collectors: int = 2
    envs: int = 3
    simulations: int = 25
    seconds: float = 20.0
    steps: Optional[int] = None
    env: str = "cartpole"
    checkpoint: Optional[str] = None
    threads: int = 1
    seed: int = 0
    #: LightZero zero-initialises the heads' last layers: untrained, every child of a search then
    #: has one latent, hence one cache key. False re-randomises them (seeded) so that keys differ
    #: as a trained model's do; a checkpoint's weights are never changed.
    zero_heads: bool = False

    def __post_init__(self) -> None:
        for name in ("collectors", "envs", "simulations", "threads"):
            positive_int(name, getattr(self, name))
        non_negative_int("seed", self.seed)
        boolean("zero_heads", self.zero_heads)
        if self.steps is not None:
            positive_int("steps", self.steps)
        elif isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) \
                or not 0 < self.seconds < math.inf:
            raise ConfigError(f"seconds must be a positive finite number, got {self.seconds!r}")
        if self.env not in ENVS:
            raise ConfigError(f"env must be one of {sorted(ENVS)}, got {self.env!r}")
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise ConfigError(f"checkpoint {self.checkpoint!r} is not a file")

    @property
    def manager_envs(self) -> int:
        """Init pools of the shared manager: every collector's envs, collector ``i`` from ``i * envs``."""
        return self.collectors * self.envs

    @property
    def steps_per_collector(self) -> Optional[int]:
        return None if self.steps is None else -(-self.steps // self.collectors)


# -- building LightZero's parts ------------------------------------------------------------------

def build_config(settings: CollectSettings, index: int) -> Tuple[Any, Any]:
    """The zoo config as LightZero's entry compiles it, on CPU, sized for one collector."""
    import importlib

    from ding.config import compile_config  # type: ignore[import-not-found]

    module, main_name, create_name = ENVS[settings.env]
    zoo = importlib.import_module(module)
    cfg, create_cfg = copy.deepcopy(getattr(zoo, main_name)), copy.deepcopy(getattr(zoo, create_name))
    create_cfg.env_manager.type = "base"  # envs step in the collector's process, as measured
    cfg.env.manager = dict(shared_memory=False)
    cfg.env.collector_env_num = cfg.env.evaluator_env_num = settings.envs
    cfg.env.n_evaluator_episode = settings.envs
    policy = cfg.policy
    policy.cuda, policy.device = False, "cpu"
    policy.collector_env_num = policy.evaluator_env_num = policy.n_episode = settings.envs
    policy.num_simulations = settings.simulations
    wm = policy.model.world_model_cfg
    wm.device, wm.num_simulations = "cpu", settings.simulations
    wm.env_num = wm.collector_env_num = wm.evaluator_env_num = settings.envs
    cfg = compile_config(cfg, seed=settings.seed + index, env=None, auto=True, create_cfg=create_cfg,
                         save_cfg=False)
    return cfg, create_cfg


def entry_spec(settings: CollectSettings) -> EntrySpec:
    """The shape of one cached entry of the zoo config's world model (float32, on CPU)."""
    cfg, _ = build_config(settings, 0)
    spec = EntrySpec.for_transformer(cfg.policy.model.world_model_cfg)
    if spec is None:
        raise ConfigError(f"the {settings.env} config does not give the world model's shape")
    return spec


def shared_manager(settings: CollectSettings, spec: EntrySpec) -> KVCacheManager:
    """One manager for every collector, in shared memory, sized as LightZero sizes its caches,
    for all of them: ``LIGHTZERO_INIT_SLOTS`` per env, recur ``simulations * all envs``, wm ``all envs``."""
    n = settings.manager_envs
    sizes = {"init_pool_size": LIGHTZERO_INIT_SLOTS, "recur_pool_size": settings.simulations * n, "wm_pool_size": n}
    return KVCacheManager(sizes, n, shared=True, entry_spec=spec)


def _load_checkpoint(policy: Any, path: str) -> None:
    """Weights from LightZero's checkpoint (``{'model': ..., ...}``) or a bare state dict; keys
    saved from the ``torch.compile`` wrapper carry ``_orig_mod.``, which is dropped."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path!r} holds no state dict")
    model = getattr(policy._model, "_orig_mod", policy._model)
    model.load_state_dict({k.replace("_orig_mod.", "", 1): v for k, v in state.items()})


def randomize_zero_heads(world_model: Any, seed: int) -> None:
    """Give the last linear layer of the policy, value, reward and next-latent heads seeded random
    weights (LightZero starts them at zero, which maps every node of a search to one latent)."""
    generator = torch.Generator().manual_seed(seed)
    for head in (world_model.head_policy, world_model.head_value, world_model.head_rewards,
                 world_model.head_observations):
        last = [m for m in head.head_module if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.5)


def build_policy(settings: CollectSettings, index: int = 0, cfg: Any = None) -> Any:
    """The UniZero policy (learn + collect modes) of the zoo config: weights from the checkpoint,
    or seeded by ``settings.seed`` (the same in every collector, as after a learner's broadcast)."""
    from ding.policy import create_policy  # type: ignore[import-not-found]
    from ding.utils import set_pkg_seed  # type: ignore[import-not-found]

    cfg = build_config(settings, index)[0] if cfg is None else cfg
    set_pkg_seed(settings.seed, use_cuda=False)
    policy = create_policy(cfg.policy, model=None, enable_field=["learn", "collect"])
    if settings.checkpoint is not None:
        _load_checkpoint(policy, settings.checkpoint)
    elif not settings.zero_heads:
        randomize_zero_heads(policy._model.world_model, settings.seed + 1)
    return policy


def build_collector(settings: CollectSettings, index: int) -> Tuple[Any, Any]:
    """``(collector, policy)`` for collector ``index``: env and search seeds ``seed + index``."""
    from ding.envs import create_env_manager, get_vec_env_setting  # type: ignore[import-not-found]
    from ding.utils import set_pkg_seed  # type: ignore[import-not-found]
    from lzero.worker import MuZeroCollector  # type: ignore[import-not-found]

    cfg, _ = build_config(settings, index)
    env_fn, collector_env_cfg, _ = get_vec_env_setting(cfg.env)
    env = create_env_manager(cfg.env.manager, [partial(env_fn, cfg=c) for c in collector_env_cfg])
    env.seed(settings.seed + index)
    policy = build_policy(settings, index, cfg)
    set_pkg_seed(settings.seed + index, use_cuda=False)
    collector = MuZeroCollector(env=env, policy=policy.collect_mode, tb_logger=None,
                                exp_name=f"collector{index}", policy_config=cfg.policy)
    return collector, policy


def legacy_pool_bytes(world_model: Any) -> int:
    """Bytes of the KV tensors in LightZero's own pools (init rings, recur and wm lists): what
    its legacy caches allocated. Slots are allocated on first use and never freed, so this is
    also their peak."""
    entries = [kv for ring in world_model.shared_pool_init_infer for kv in ring]
    entries += list(world_model.shared_pool_recur_infer) + list(world_model.shared_pool_wm)
    storages: Dict[int, int] = {}
    for kv in entries:
        for layer in getattr(kv, "_keys_values", ()):
            for cache in (layer._k_cache, layer._v_cache):
                storage = cache._cache.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# -- one worker process ----------------------------------------------------------------------------

class _Stop(Exception):
    """Raised from the policy's forward to end a collect call where the run ends."""


class _Meter:
    """Counts env steps as the collector's forwards issue them; stops the collector at the
    deadline or step target. Each forward steps every ready env once."""

    def __init__(self, progress: Any, index: int) -> None:
        self.progress, self.index = progress, index
        self.steps, self.forwards = 0, 0
        self.deadline = math.inf
        self.target: Optional[int] = None

    def arm(self, seconds: Optional[float], target: Optional[int]) -> None:
        self.steps, self.forwards = 0, 0
        self.progress[self.index] = 0
        self.target = target
        self.deadline = math.inf if seconds is None else time.perf_counter() + seconds

    def wrap(self, forward: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if time.perf_counter() >= self.deadline or (self.target is not None and self.steps >= self.target):
                raise _Stop()
            out = forward(*args, **kwargs)
            self.forwards += 1
            self.steps += len(kwargs.get("ready_env_id") or args[0])
            self.progress[self.index] = self.steps
            return out

        return counted


def _collect_until_stopped(collector: Any, envs: int) -> None:
    while True:
        try:
            collector.collect(n_episode=envs, policy_kwargs={"temperature": 1.0, "epsilon": 0.0})
        except _Stop:
            return


def _counters(world_model: Any) -> Dict[str, int]:
    """LightZero's own lookup counters: the same definitions in both phases."""
    return {"root_hits": world_model.root_hit_cnt, "root_queries": world_model.root_total_query_cnt,
            "recur_hits": world_model.hit_count, "recur_queries": world_model.total_query_count}


def _foreign(adapters: Any) -> Dict[str, int]:
    return {"foreign_hits": sum(a.collector.foreign_hits for a in adapters),
            "rejected": sum(a.collector.rejected for a in adapters)}


def _timed(settings: CollectSettings, collector: Any, meter: _Meter, world_model: Any, adapters: Any,
           gates: Tuple[Any, Any]) -> Dict[str, Any]:
    """Wait for every collector, collect for the run's length; what the timed part did."""
    before, foreign_before = _counters(world_model), _foreign(adapters)
    for gate in gates:  # every collector warm; the launcher zeroes the pools' counters; go
        gate.wait(600)
    meter.arm(None if settings.steps else settings.seconds, settings.steps_per_collector)
    start, cpu = time.perf_counter(), time.process_time()
    _collect_until_stopped(collector, settings.envs)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    after, foreign_after = _counters(world_model), _foreign(adapters)
    result = {"steps": meter.steps, "forwards": meter.forwards, "elapsed_s": elapsed, "cpu_s": cpu,
              **{k: after[k] - before[k] for k in after}}
    if adapters:
        result.update({k: foreign_after[k] - foreign_before[k] for k in foreign_after})
    else:  # the world model's slot lists are its own only without adapters
        result["legacy_pool_bytes"] = legacy_pool_bytes(world_model)
    return result


def _run(settings: CollectSettings, index: int, phase: str, handle: Optional[ManagerHandle], progress: Any,
         gates: Tuple[Any, Any]) -> Dict[str, Any]:
    torch.set_num_threads(settings.threads)
    collector, policy = build_collector(settings, index)
    meter = _Meter(progress, index)
    collector._policy = collector._policy._replace(forward=meter.wrap(collector._policy.forward))
    adapters: List[LightZeroCacheAdapter] = []
    try:
        if phase == "shared":
            adapters = enable(policy, handle=handle, first_env=index * settings.envs)
        meter.arm(None, WARMUP_FORWARDS * settings.envs)
        _collect_until_stopped(collector, settings.envs)
        result = _timed(settings, collector, meter, policy._collect_model.world_model, adapters, gates)
        return {"index": index, "phase": phase, "first_env": index * settings.envs, "envs": settings.envs, **result}
    finally:
        for adapter in adapters:
            adapter.close()
        if adapters:
            adapters[0].manager.close()  # this process's attachment; the launcher owns the segments
        collector.close()


def _quiet(log_path: str) -> None:
    """Send this worker's prints and logs (LightZero prints on every clear) to its own log file."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def worker_main(settings: CollectSettings, index: int, phase: str, handle: Optional[ManagerHandle],
                progress: Any, results: Any, gates: Tuple[Any, Any], workdir: str) -> None:
    """One collector's process: build, warm up, wait for the others, collect, report a dict on
    ``results`` (``{"index", "error"}`` if anything failed). Runs in ``workdir``, where
    MuZeroCollector writes its logs."""
    os.chdir(workdir)
    _quiet(os.path.join(workdir, f"collector{index}.log"))
    try:
        if phase not in PHASES:
            raise ConfigError(f"phase must be one of {PHASES}, got {phase!r}")
        if (phase == "shared") != (handle is not None):
            raise ConfigError("the shared phase needs the launcher's manager handle; the lightzero phase takes none")
        results.put(_run(settings, index, phase, handle, progress, gates))
    except BaseException as exc:
        for gate in gates:  # no one waits for a collector that will never start
            gate.abort()
        results.put({"index": index, "phase": phase, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()})

