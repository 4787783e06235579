"""A small main-branch UniZero model, driven as LightZero's collector and MCTS drive it.

Image observations 3x64x64, a 2-layer, 2-head transformer with embed 32, a context of 6 tokens
(3 observation/action pairs, so windows roll over from the third step), 3 envs, 3 actions and 5
simulations per search, on CPU, seeded. :func:`run` calls ``initial_inference`` once per env step
and ``recurrent_inference`` once per simulation, as ``UniZeroMCTSCtree.search`` does, with a small
deterministic tree standing in for the C++ one, and clears the caches where the policy does
(:data:`SCHEDULE`). It records every output tensor, the world model's hit counters, each pool's
counters and, after every call, which keys each pool holds.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

ENV_NUM = 3
NUM_SIM = 5
ACTIONS = 3
OBS_SHAPE = (3, 64, 64)
CONTEXT = 6
STEPS = 8
#: Filled by the tests, printed at the end of the run: variant -> (initial-inference outputs,
#: recurrent-inference outputs, mismatches) compared bit for bit.
COMPARED: Dict[str, Tuple[int, int, int]] = {}

#: What happens after each env step (LightZero's own clearing calls, see the functions below):
#: an episode end in the collector, a periodic clear_caches (kv_cache_clear_interval), an episode
#: end in the evaluator. ``ready`` lists the envs that take part in a step (all by default).
SCHEDULE: Dict[int, Dict[str, Any]] = {
    3: {"after": ("collector_episode_end", 1)},  # step 4 mixes a first step with continuing envs
    5: {"ready": [0, 2], "after": ("clear_caches", None)},
    6: {"after": ("evaluator_episode_end", 2)},
}


def world_model_config(**overrides: Any) -> Any:
    from easydict import EasyDict

    cfg = dict(
        encoder_type="resnet", continuous_action_space=False, tokens_per_block=2, max_blocks=10, max_tokens=20,
        context_length=CONTEXT, gru_gating=False, device="cpu", analysis_sim_norm=False,
        analysis_dormant_ratio_weight_rank=False, action_space_size=ACTIONS, group_size=8, attention="causal",
        num_layers=2, num_heads=2, embed_dim=32, embed_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1,
        support_size=21, max_cache_size=5000, use_new_cache_manager=True, env_num=ENV_NUM,
        num_simulations=NUM_SIM, latent_recon_loss_weight=0.0, perceptual_loss_weight=0.0,
        policy_entropy_weight=0.0, final_norm_option_in_head="LayerNorm", final_norm_option_in_encoder="LayerNorm",
        predict_latent_loss_type="mse", obs_type="image", gamma=1, dormant_threshold=0.025, rotary_emb=False,
        rope_theta=10000, max_seq_len=8192, lora_r=0, lora_alpha=1, lora_dropout=0.0, decode_loss_mode=None,
        task_embed_option=None, use_task_embed=False, use_normal_head=True, use_softmoe_head=False,
        use_moe_head=False, num_experts_in_moe_head=4, moe_in_transformer=False,
        multiplication_moe_in_transformer=False, n_shared_experts=1, num_experts_per_tok=1,
        num_experts_of_moe_in_transformer=8, norm_type="LN", game_segment_length=20, use_priority=False,
        register_token_num=0, register_token_shared=False, num_unroll_steps=5,
        # Untrained zero heads would predict one latent for every node, so every node would share
        # one cache key: initialise them randomly (seeded) instead.
        last_linear_layer_init_zero=False,
    )
    cfg.update(overrides)
    return EasyDict(cfg)


def build_model(seed: int = 0, **config: Any) -> Any:
    """The main-branch UniZeroModel, in eval mode, built with whatever KVCacheManager class stands
    in LightZero's kv_cache_manager module now."""
    from lzero.model.unizero_model import UniZeroModel

    logging.getLogger().setLevel(logging.WARNING)  # LightZero turns the root logger up
    torch.manual_seed(seed)
    model = UniZeroModel(observation_shape=OBS_SHAPE, action_space_size=ACTIONS, num_res_blocks=1, num_channels=8,
                         norm_type="LN", world_model_cfg=world_model_config(**config))
    return model.eval()


def weights_digest(model: Any) -> int:
    """One number for all of a model's weights and buffers (equal models, equal digests)."""
    import xxhash

    h = xxhash.xxh64()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.intdigest()


def twin_with_weights(model: Any, seed: int = 0, **config: Any) -> Any:
    """A model built now (so with the manager class standing now), with ``model``'s weights."""
    twin = build_model(seed, **config)
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    assert weights_digest(twin) == weights_digest(model)
    return twin


# -- the policy's cache clears, line for line (lzero/policy/unizero.py, use_new_cache_manager) --

def collector_episode_end(wm: Any, eid: int) -> None:
    """``UniZeroPolicy._reset_collect(env_id=[eid], current_steps=None)``."""
    if eid < wm.env_num:
        wm.kv_cache_manager.init_pools[eid].clear()
    if hasattr(wm, "past_token_context_init_infer_envs") and eid < wm.env_num:
        wm.past_token_context_init_infer_envs[eid].clear()


def evaluator_episode_end(wm: Any, eid: int) -> None:
    """``UniZeroPolicy._reset_eval(env_id=[eid], current_steps=None)``."""
    if eid < wm.env_num:
        wm.kv_cache_manager.init_pools[eid].clear()
    if hasattr(wm, "past_token_context_init_infer_envs") and eid < wm.env_num:
        wm.past_token_context_init_infer_envs[eid].clear()
    wm.kv_cache_manager.clear_recur_cache()
    if hasattr(wm, "past_token_context_recurrent_infer"):
        wm.past_token_context_recurrent_infer.clear()
    wm.keys_values_wm_list.clear()


def clear_caches(wm: Any, _: Optional[int] = None) -> None:
    """The periodic clear (``current_steps % kv_cache_clear_interval == 0``) and after training."""
    wm.clear_caches()


#: The world model's own counters: recurrent and root lookups and hits, windows rebuilt from
#: tokens, batches that needed left padding.
WM_COUNTERS = ("hit_count", "total_query_count", "root_hit_cnt", "root_total_query_cnt",
               "exact_kv_reset_batches", "exact_kv_reset_samples", "kv_padding_unequal_batches")

CLEARS = {"collector_episode_end": collector_episode_end, "evaluator_episode_end": evaluator_episode_end,
          "clear_caches": clear_caches}


@dataclass
class Result:
    outputs: List[Tuple[str, torch.Tensor]] = field(default_factory=list)  # (call.field, tensor)
    counters: Dict[str, int] = field(default_factory=dict)  # the world model's own hit counters
    pool_stats: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)  # pool -> (hits, misses, evictions)
    key_sets: List[Dict[str, frozenset]] = field(default_factory=list)  # after each call: pool -> keys

    def count(self, prefix: str = "") -> int:
        return sum(1 for name, _ in self.outputs if name.startswith(prefix))


def _pool_keys(wm: Any) -> Dict[str, frozenset]:
    """The keys of each pool, as this world model sees them: in a recur pool shared by several
    collectors (an attached manager), the keys this one holds."""
    m = wm.kv_cache_manager
    keys = {f"init_env{e}": frozenset(p._key_to_index.keys()) for e, p in enumerate(m.init_pools)}
    view = getattr(m, "collector_view", None)
    keys["recurrent"] = view.stored_keys(m.recur_pool) if view is not None else frozenset(m.recur_pool._key_to_index)
    return keys


def run(model: Any, steps: int = STEPS, seed: int = 0, schedule: Optional[Dict[int, Dict[str, Any]]] = None,
        after_step: Any = None) -> Result:
    """Drive ``steps`` env steps; ``after_step(step, model, out)`` may act between steps."""
    torch.set_num_threads(1)
    schedule = SCHEDULE if schedule is None else schedule
    rng = np.random.RandomState(seed)
    wm = model.world_model
    res = Result()
    last_obs = torch.zeros(ENV_NUM, *OBS_SHAPE)
    last_action = [-1] * ENV_NUM
    cur_obs = torch.from_numpy(rng.rand(ENV_NUM, *OBS_SHAPE).astype(np.float32))
    timestep = np.zeros(ENV_NUM, dtype=np.int64)

    for step in range(steps):
        plan = schedule.get(step, {})
        ready: List[int] = list(plan.get("ready", range(ENV_NUM)))
        with torch.no_grad():
            out = model.initial_inference(last_obs[ready], [last_action[e] for e in ready], cur_obs[ready],
                                          timestep[ready], ready_env_id=ready)
        res.outputs += [(f"initial.{f}", getattr(out, f).clone()) for f in ("latent_state", "value", "policy_logits")]
        res.key_sets.append(_pool_keys(wm))
        _search(model, out.latent_state.detach().cpu().numpy(), timestep[ready], res)
        for b, e in enumerate(ready):
            last_obs[e] = cur_obs[e]
            last_action[e] = int((int(out.policy_logits[b].argmax()) + step + e) % ACTIONS)
            timestep[e] += 1
        cur_obs = torch.from_numpy(rng.rand(ENV_NUM, *OBS_SHAPE).astype(np.float32))
        if after_step is not None:
            after_step(step, model, out)
        if "after" in plan:
            what, eid = plan["after"]
            CLEARS[what](wm, eid)
            if what != "clear_caches":  # the env starts a new episode: a first step next
                last_obs[eid] = 0.0
                last_action[eid] = -1
                timestep[eid] = 0
            res.key_sets.append(_pool_keys(wm))

    res.counters = {k: int(getattr(wm, k)) for k in WM_COUNTERS}
    m = wm.kv_cache_manager
    for name, pool in [*((f"init_env{e}", p) for e, p in enumerate(m.init_pools)), ("recurrent", m.recur_pool)]:
        res.pool_stats[name] = (pool.stats.hits, pool.stats.misses, pool.stats.evictions)
    view = getattr(m, "collector_view", None)
    if view is not None:  # a shared recur pool counts every collector: this one's own lookups
        own = view.stats()["pools"][m.recur_pool.name]
        res.pool_stats["recurrent"] = (own["hits"], own["misses"], 0)  # a held entry is never evicted
    return res


def _search(model: Any, roots: np.ndarray, timestep: np.ndarray, res: Result) -> None:
    """NUM_SIM simulations over one small deterministic tree per root, as the C++ tree calls the model:
    each simulation expands one (node, action) per root; the latents travel as numpy."""
    n = roots.shape[0]
    nodes: List[List[Tuple[np.ndarray, int]]] = [[(roots[b], 0)] for b in range(n)]
    expanded: List[set] = [set() for _ in range(n)]
    history: List[Tuple[np.ndarray, torch.Tensor]] = []
    for sim in range(NUM_SIM):
        parents, actions, depths = [], [], []
        for b in range(n):
            # Deepen the newest node, widen from the root, or go back to the first child (written
            # several simulations ago: a small FIFO recur pool has evicted it by then).
            first = [len(nodes[b]) - 1, 0, min(1, len(nodes[b]) - 1)][sim % 3]
            for idx in [first] + list(range(len(nodes[b]))):
                free = [a for a in ((b + sim + k) % ACTIONS for k in range(ACTIONS)) if (idx, a) not in expanded[b]]
                if free:
                    break
            expanded[b].add((idx, free[0]))
            latent, depth = nodes[b][idx]
            parents.append(latent)
            actions.append(free[0])
            depths.append(depth + 1)
        history.append((np.asarray(parents), torch.from_numpy(np.asarray(actions)).long()))
        with torch.no_grad():
            rec = model.recurrent_inference(history, sim, depths, timestep)
        res.outputs += [(f"recurrent.{f}", getattr(rec, f).clone())
                        for f in ("latent_state", "reward", "value", "policy_logits")]
        res.key_sets.append(_pool_keys(model.world_model))
        new = rec.latent_state.detach().cpu().numpy()
        for b in range(n):
            nodes[b].append((new[b], depths[b]))


def mismatches(a: Result, b: Result) -> List[str]:
    """Every output that differs bit for bit (torch.equal), by position and name."""
    if [name for name, _ in a.outputs] != [name for name, _ in b.outputs]:
        return ["the two runs made different calls"]
    return [f"{i}:{name}" for i, ((name, x), (_, y)) in enumerate(zip(a.outputs, b.outputs)) if not torch.equal(x, y)]

