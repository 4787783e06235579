"""A small real UniZero model from LightZero 0.2.0, driven as its MCTS collector drives it.

CartPole-sized (vector obs of 4, 2 actions, embed 64, 2 layers, 2 heads, context 8), 3 envs and
4 simulations per search, on CPU, seeded. ``run_episode`` calls ``initial_inference`` once per env
step and ``recurrent_inference`` once per simulation, as ``UniZeroMCTSCtree.search`` does, with a
small deterministic tree standing in for the C++ one, and returns every output tensor.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from easydict import EasyDict

from concurrent_kv.integrations.lightzero_collect import randomize_zero_heads

ENV_NUM = 3
NUM_SIM = 4
OBS_DIM = 4
ACTIONS = 2


def world_model_config(**overrides: Any) -> EasyDict:
    cfg = dict(
        continuous_action_space=False, tokens_per_block=2, max_blocks=10, max_tokens=20, context_length=8,
        context_length_for_recurrent=8, gru_gating=False, device="cpu", analysis_sim_norm=False,
        analysis_dormant_ratio=False, action_space_size=ACTIONS, group_size=8, attention="causal",
        num_layers=2, num_heads=2, embed_dim=64, embed_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1,
        support_size=101, max_cache_size=5000, env_num=ENV_NUM, num_simulations=NUM_SIM,
        latent_recon_loss_weight=0.0, perceptual_loss_weight=0.0, policy_entropy_weight=0,
        predict_latent_loss_type="group_kl", obs_type="vector", gamma=1, dormant_threshold=0.025,
        rotary_emb=False, rope_theta=10000, max_seq_len=8192,
    )
    cfg.update(overrides)
    return EasyDict(cfg)


def build_model(seed: int = 0, **config: Any) -> Any:
    """The UniZero model, in eval mode, with its zero-initialised heads re-randomised (seeded):
    untrained zero heads predict one latent for every node, so every node would share one key."""
    from lzero.model.unizero_model import UniZeroModel

    logging.getLogger().setLevel(logging.WARNING)  # world_model.py sets the root logger to DEBUG
    torch.manual_seed(seed)
    model = UniZeroModel(observation_shape=OBS_DIM, action_space_size=ACTIONS, norm_type="BN",
                         world_model_cfg=world_model_config(**config))
    model.eval()
    randomize_zero_heads(model.world_model, seed + 1)
    return model


def twin(model: Any) -> Any:
    """An independent copy with identical weights and empty caches."""
    return copy.deepcopy(model)


#: The clears a UniZero run makes besides the per-search one inside ``initial_inference``.
CLEARS = ("reset_collect", "clear_caches", "env_done", "eval_done", "recur")


def clear(wm: Any, kind: str) -> None:
    """``reset_collect``: what ``UniZeroPolicy._reset_collect`` does every 200 steps of an episode;
    ``clear_caches``: what training phases call (``recompute_pos_emb_diff_and_clear_cache``);
    ``env_done``: a collector env's episode end (its root dict); ``eval_done``: an evaluator env's
    (its root dict, the recur dict, keys_values_wm_list); ``recur``: the recur dict alone (the
    per-search clear, or the dormant-ratio analysis), which inside a search makes lookups miss."""
    if kind == "reset_collect":
        for env_dict in wm.past_kv_cache_init_infer_envs:
            env_dict.clear()
        wm.past_kv_cache_recurrent_infer.clear()
        wm.keys_values_wm_list.clear()
    elif kind == "clear_caches":
        wm.clear_caches()
    elif kind == "env_done":
        wm.past_kv_cache_init_infer_envs[0].clear()
    elif kind == "eval_done":
        wm.past_kv_cache_init_infer_envs[1].clear()
        wm.past_kv_cache_recurrent_infer.clear()
        wm.keys_values_wm_list.clear()
    elif kind == "recur":
        wm.past_kv_cache_recurrent_infer.clear()
    else:
        raise ValueError(f"unknown clear {kind!r}; expected one of {CLEARS}")


def run_steps(model: Any, steps: int, seed: int = 0, env_ids: List[int] = None,
              clears: Dict[int, str] = None, before_step: Any = None, sims: int = NUM_SIM,
              sim_clears: Dict[Tuple[int, int], str] = None, envs: int = ENV_NUM) -> Dict[str, Any]:
    """Drive ``steps`` env steps of ``sims`` simulations of ``envs`` envs (the model's
    ``env_num``); return every output and the world model's hit counters.

    ``seed`` picks the observation stream; ``clears`` maps a step to a clear made before it,
    ``sim_clears`` a (step, simulation) to a clear made before that recurrent call;
    ``before_step(step)`` is called at the start of every step (to synchronise collectors).
    Inputs go to the model's device, as LightZero's policy puts them there."""
    torch.set_num_threads(1)
    rng = np.random.RandomState(seed)
    wm = model.world_model
    device = wm.device
    outputs: List[torch.Tensor] = []
    calls = {"initial": 0, "recurrent": 0}
    last_obs = torch.zeros(envs, OBS_DIM, device=device)
    last_action = [-1] * envs
    cur_obs = torch.from_numpy(rng.randn(envs, OBS_DIM).astype(np.float32)).to(device)
    timestep = np.zeros(envs, dtype=np.int64)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        if clears and step in clears:
            clear(wm, clears[step])
        with torch.no_grad():
            out = model.initial_inference(last_obs, last_action, cur_obs, timestep)
        calls["initial"] += 1
        outputs += [out.latent_state.clone(), out.value.clone(), out.policy_logits.clone()]
        root = out.latent_state.detach().cpu().numpy()
        nodes = [[(root[b], 0)] for b in range(envs)]
        expanded: List[set] = [set() for _ in range(envs)]
        history = []
        for sim in range(sims):
            if sim_clears and (step, sim) in sim_clears:
                clear(wm, sim_clears[(step, sim)])
            parents, actions, depths = [], [], []
            for b in range(envs):
                order = ([len(nodes[b]) - 1, 0] if sim % 2 == 0 else [0, len(nodes[b]) - 1]) + list(range(len(nodes[b])))
                for idx in order:
                    free = [a for a in ((b + k) % ACTIONS for k in range(ACTIONS)) if (idx, a) not in expanded[b]]
                    if free:
                        break
                expanded[b].add((idx, free[0]))
                latent, depth = nodes[b][idx]
                parents.append(latent)
                actions.append(free[0])
                depths.append(depth + 1)
            history.append((np.asarray(parents), torch.from_numpy(np.asarray(actions)).long().to(device)))
            with torch.no_grad():
                rec = model.recurrent_inference(history, sim, depths, timestep)
            calls["recurrent"] += 1
            outputs += [rec.latent_state.clone(), rec.reward.clone(), rec.value.clone(), rec.policy_logits.clone()]
            new = rec.latent_state.detach().cpu().numpy()
            for b in range(envs):
                nodes[b].append((new[b], depths[b]))
        action = [(int(a) + step + b) % ACTIONS for b, a in enumerate(out.policy_logits.argmax(-1).tolist())]
        last_obs, last_action = cur_obs, action
        cur_obs = torch.from_numpy(rng.randn(envs, OBS_DIM).astype(np.float32)).to(device)
        timestep = timestep + 1
    return {
        "outputs": outputs,
        "calls": calls,
        "recur_hits": wm.hit_count,
        "recur_queries": wm.total_query_count,
        "root_hits": wm.root_hit_cnt,
        "root_queries": wm.root_total_query_cnt,
    }


def same_outputs(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return len(a["outputs"]) == len(b["outputs"]) and all(
        torch.equal(x, y) for x, y in zip(a["outputs"], b["outputs"]))
