"""One torchrun rank of the launch test: a real UniZero collector on its node's shared manager.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/lightzero/torchrun_collector.py OUT
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from concurrent_kv import EntrySpec
from concurrent_kv.integrations.lightzero import attach
from concurrent_kv.launch import local_rank_and_size, node_manager
from tests.lightzero.collectors import STEPS, compare, schedule
from tests.lightzero.unizero_small import ENV_NUM, NUM_SIM, build_model, run_steps, twin, world_model_config


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    local_rank, local_size = local_rank_and_size()
    base = build_model(seed=0)
    wm = base.world_model
    reference = run_steps(twin(base), STEPS, seed=200 + local_rank, clears=schedule(local_rank))
    sizes = {"init_pool_size": len(wm.shared_pool_init_infer[0]), "recur_pool_size": local_size * NUM_SIM * ENV_NUM,
             "wm_pool_size": local_size * len(wm.shared_pool_wm)}
    manager = node_manager(sizes, ENV_NUM, entry_spec=EntrySpec.for_transformer(world_model_config()))
    model = twin(base)
    adapter = attach(model.world_model, manager, mode="new", first_env=local_rank * ENV_NUM)
    dist.barrier()
    ours = run_steps(model, STEPS, seed=200 + local_rank, clears=schedule(local_rank))
    result = compare(ours, reference)
    result.update(rank=dist.get_rank(), first_env=adapter.collector.first_env,
                  recur_pool=manager.handle().pools[-2].meta_path)
    adapter.close()
    dist.barrier()  # the owner (local rank 0) closes last
    manager.close()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
