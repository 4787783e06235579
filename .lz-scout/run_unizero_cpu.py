"""Scout: run LightZero 0.2.0's real UniZero world model on CPU, MCTS-style.

Run with:  /tmp/lzvenv/bin/python /work/main/.lz-scout/run_unizero_cpu.py [--rotary] [--steps N]

Builds a small CartPole-like (vector obs, 2 actions) UniZeroModel, then for a few
env steps calls initial_inference (as UniZeroPolicy._forward_collect does) and
num_simulations rounds of recurrent_inference (as UniZeroMCTSCtree.search does:
state_action_history=[(latent np.ndarray, actions LongTensor)], simulation_index,
search_depth, timestep). Tree selection is a tiny deterministic stand-in for the
C++ tree: each simulation expands one new child of an existing node.
Prints shapes and the world model's KV-cache bookkeeping/counters.
"""
import argparse
import hashlib
import logging
import os
import random
import sys

import numpy as np
import torch
from easydict import EasyDict

from lzero.model.unizero_model import UniZeroModel
from lzero.model.unizero_world_models.utils import hash_state

p = argparse.ArgumentParser()
p.add_argument('--rotary', action='store_true', help='rotary_emb=True (as in cartpole_unizero_config)')
p.add_argument('--steps', type=int, default=4)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--zero-heads', action='store_true',
               help='keep LightZero init (last head layers zeroed -> every predicted latent is identical, '
                    'so all recurrent states hash to ONE key); default re-randomizes them')
args = p.parse_args()

SEED = args.seed
ENV_NUM = 3
NUM_SIM = 4
OBS_DIM = 4
A = 2
random.seed(SEED)
np.random.seed(SEED)
torch.manual_seed(SEED)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
logging.getLogger().setLevel(logging.WARNING)  # world_model.py sets root logger to DEBUG at import

# world_model_cfg: policy/unizero.py defaults, overridden as in cartpole_unizero_config.py, shrunk
wm_cfg = EasyDict(dict(
    continuous_action_space=False,
    tokens_per_block=2,
    max_blocks=10,
    max_tokens=2 * 10,          # must equal 2*max_blocks (asserted in UniZeroModel)
    context_length=2 * 4,
    context_length_for_recurrent=2 * 4,
    gru_gating=False,
    device='cpu',
    analysis_sim_norm=False,
    analysis_dormant_ratio=False,
    action_space_size=A,
    group_size=8,
    attention='causal',
    num_layers=2,
    num_heads=2,
    embed_dim=64,
    embed_pdrop=0.1,
    resid_pdrop=0.1,
    attn_pdrop=0.1,
    support_size=101,
    max_cache_size=5000,
    env_num=ENV_NUM,
    num_simulations=NUM_SIM,    # read via getattr -> sizes shared_pool_recur_infer
    latent_recon_loss_weight=0.,
    perceptual_loss_weight=0.,
    policy_entropy_weight=0,
    predict_latent_loss_type='group_kl',
    obs_type='vector',
    gamma=1,
    dormant_threshold=0.025,
    rotary_emb=args.rotary,
    rope_theta=10000,
    max_seq_len=8192,
))

model = UniZeroModel(observation_shape=OBS_DIM, action_space_size=A, norm_type='BN',
                     world_model_cfg=wm_cfg)
model.eval()
wm = model.world_model
if not args.zero_heads:
    # WorldModel._initialize_last_layer zeroes the last Linear of every head; an untrained model then
    # predicts the same latent for every (state, action) and all tree nodes collide on one hash key.
    # Re-randomize (seeded) so the cache sees distinct keys like a trained model would.
    g = torch.Generator().manual_seed(SEED + 1)
    for head in [wm.head_policy, wm.head_value, wm.head_rewards, wm.head_observations]:
        for layer in reversed(head.head_module):
            if isinstance(layer, torch.nn.Linear):
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.5)
                break


def kv_desc(kv):
    if kv is None:
        return 'None'
    c = kv._keys_values[0]._k_cache._cache
    return f'KeysValues(layers={len(kv)}, cache={tuple(c.shape)}, size={kv.size})'


print('\n=== cache structures at init ===')
for name in ['past_kv_cache_recurrent_infer', 'past_kv_cache_init_infer_envs', 'keys_values_wm_list',
             'keys_values_wm_size_list', 'shared_pool_recur_infer', 'shared_pool_size', 'shared_pool_index',
             'shared_pool_init_infer', 'shared_pool_size_init', 'shared_pool_index_init_envs', 'shared_pool_wm',
             'shared_pool_size_wm', 'shared_pool_index_wm', 'hit_count', 'total_query_count', 'root_hit_cnt',
             'root_total_query_cnt', 'max_cache_size', 'reanalyze_phase']:
    v = getattr(wm, name)
    if isinstance(v, list):
        print(f'  {name}: list len={len(v)} first={type(v[0]).__name__ if v else None}')
    elif isinstance(v, dict):
        print(f'  {name}: {type(v).__name__} len={len(v)}')
    else:
        print(f'  {name}: {type(v).__name__} = {v}')
for name in ['keys_values_wm', 'keys_values_wm_single_env', 'keys_values_wm_single_env_tmp']:
    print(f'  {name}: {kv_desc(getattr(wm, name))}')
print('  hash_state(np.zeros(64,float32)) ->', repr(hash_state(np.zeros(64, np.float32))),
      type(hash_state(np.zeros(64, np.float32))).__name__)

rng = np.random.RandomState(SEED)
last_obs = torch.zeros(ENV_NUM, OBS_DIM)
last_action = [-1] * ENV_NUM
cur_obs = torch.from_numpy(rng.randn(ENV_NUM, OBS_DIM).astype(np.float32))
timestep = np.zeros(ENV_NUM, dtype=np.int64)
digest = hashlib.sha256()

for step in range(args.steps):
    h0, q0, rh0, rq0 = wm.hit_count, wm.total_query_count, wm.root_hit_cnt, wm.root_total_query_cnt
    with torch.no_grad():
        out = model.initial_inference(last_obs, last_action, cur_obs, timestep)
    root_latent = out.latent_state.detach().cpu().numpy()          # (B, 1, E)
    print(f'\n--- env step {step}: timestep={timestep.tolist()} last_action={last_action}')
    print(f'  init: latent {tuple(out.latent_state.shape)} value {tuple(out.value.shape)} '
          f'policy {tuple(out.policy_logits.shape)} reward {type(out.reward).__name__}[{len(out.reward)}]')
    digest.update(out.latent_state.numpy().tobytes()); digest.update(out.policy_logits.numpy().tobytes())

    # mini "tree": nodes[b] = list of (latent (1,E) np, depth); expand one child per simulation
    nodes = [[(root_latent[b], 0)] for b in range(ENV_NUM)]
    state_action_history = []
    for sim in range(NUM_SIM):
        parents, actions, depths = [], [], []
        for b in range(ENV_NUM):
            # deterministic choice: alternate between deepest node and root
            idx = len(nodes[b]) - 1 if sim % 2 == 0 else 0
            lat, d = nodes[b][idx]
            parents.append(lat); depths.append(d + 1)
            actions.append((sim + b) % A)
        latent_in = torch.from_numpy(np.asarray(parents))            # as mcts_ctree: (B, 1, E)
        act_in = torch.from_numpy(np.asarray(actions)).long()
        state_action_history.append((latent_in.detach().cpu().numpy(), act_in))
        with torch.no_grad():
            ro = model.recurrent_inference(state_action_history, sim, depths, timestep)
        nl = ro.latent_state.detach().cpu().numpy()
        for b in range(ENV_NUM):
            nodes[b].append((nl[b], depths[b]))
        digest.update(nl.tobytes()); digest.update(ro.reward.numpy().tobytes())
        digest.update(ro.value.numpy().tobytes()); digest.update(ro.policy_logits.numpy().tobytes())
        if True:
            print(f'  recur sim{sim}: latent {tuple(ro.latent_state.shape)} reward {tuple(ro.reward.shape)} '
                  f'value {tuple(ro.value.shape)} policy {tuple(ro.policy_logits.shape)} '
                  f'kv sizes {wm.keys_values_wm_size_list}')

    # env action: argmax of root policy logits; next obs synthetic + deterministic
    env_action = out.policy_logits.argmax(-1).tolist()
    env_action = [(a + step + b) % A for b, a in enumerate(env_action)]  # zero-init heads -> logits tie; vary
    last_obs, last_action = cur_obs, env_action
    cur_obs = torch.from_numpy(rng.randn(ENV_NUM, OBS_DIM).astype(np.float32))
    timestep = timestep + 1
    print(f'  counters: recur hits {wm.hit_count - h0}/{wm.total_query_count - q0}, '
          f'root hits {wm.root_hit_cnt - rh0}/{wm.root_total_query_cnt - rq0}; '
          f'len(past_kv_cache_recurrent_infer)={len(wm.past_kv_cache_recurrent_infer)} '
          f'len(init dicts)={[len(d) for d in wm.past_kv_cache_init_infer_envs]} '
          f'shared_pool_index={wm.shared_pool_index} init_idx={wm.shared_pool_index_init_envs} '
          f'wm_idx={wm.shared_pool_index_wm}')

print('\n=== totals ===')
print(f'  recurrent: hit_count={wm.hit_count} total_query_count={wm.total_query_count}')
print(f'  root(init): root_hit_cnt={wm.root_hit_cnt} root_total_query_cnt={wm.root_total_query_cnt}')
print(f'  shared_pool_recur_infer filled: {sum(x is not None for x in wm.shared_pool_recur_infer)}/{wm.shared_pool_size}, '
      f'example {kv_desc(next(x for x in wm.shared_pool_recur_infer if x is not None))}')
print(f'  shared_pool_init_infer filled: {[sum(x is not None for x in e) for e in wm.shared_pool_init_infer]}')
print(f'  shared_pool_wm filled: {sum(x is not None for x in wm.shared_pool_wm)}/{wm.shared_pool_size_wm}')
k = next(iter(wm.past_kv_cache_recurrent_infer))
print(f'  recur dict key example: {k!r} ({type(k).__name__}) -> {wm.past_kv_cache_recurrent_infer[k]!r}')
print('  output digest (sha256 over latents/rewards/values/logits):', digest.hexdigest()[:16])

# probe: a recurrent query whose latent is NOT in any cache
try:
    bogus = np.full((ENV_NUM, 1, 64), 0.123, np.float32)
    with torch.no_grad():
        model.recurrent_inference([(bogus, torch.zeros(ENV_NUM, dtype=torch.long))], 0, [1] * ENV_NUM, timestep)
    print('  miss probe: no error (miss regenerated from scratch)')
except Exception as e:
    print(f'  miss probe: {type(e).__name__}: {e}')

wm.clear_caches()
print(f'  after clear_caches: recur dict={len(wm.past_kv_cache_recurrent_infer)} '
      f'init dicts={[len(d) for d in wm.past_kv_cache_init_infer_envs]} '
      f'pools still hold {sum(x is not None for x in wm.shared_pool_recur_infer)} recur entries')
