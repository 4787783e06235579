"""Getting a shared manager into every collector, however the collectors were started.

* **multiprocessing workers** (spawn, fork, forkserver): the parent creates a ``shared=True``
  manager and passes ``manager.handle()`` (a small picklable object) to each worker, which calls
  :func:`worker_collector` (or ``KVCacheManager.attach(handle).collector(...)`` itself);
* **torchrun ranks** (LightZero's DDP entries start one collector per rank): every rank calls
  :func:`node_manager` after ``torch.distributed.init_process_group``. Local rank 0 of each node
  creates the node's manager and hands its handle to the node's other ranks over
  ``torch.distributed`` (any backend: gloo on CPU); each node has its own manager, since shared
  memory does not cross machines. Rank ``r`` then takes the init pools
  ``local_rank * envs_per_rank ...`` through :func:`rank_collector`.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from .checks import positive_int
from .collector import CollectorCaches
from .entry import EntrySpec
from .errors import ConfigError
from .manager import KVCacheManager, ManagerHandle

__all__ = ["worker_collector", "node_manager", "rank_collector", "local_rank_and_size"]


def worker_collector(handle: ManagerHandle, index: int, envs_per_collector: int) -> Tuple[KVCacheManager, CollectorCaches]:
    """In a worker process: attach to the shared manager behind ``handle`` and take collector
    ``index``'s envs. Close the collector, then the manager, when the worker is done."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"index must be an int >= 0, got {index!r}")
    positive_int("envs_per_collector", envs_per_collector)
    manager = KVCacheManager.attach(handle)
    try:
        return manager, manager.collector(index * envs_per_collector, envs_per_collector)
    except BaseException:
        manager.close()
        raise


def local_rank_and_size() -> Tuple[int, int]:
    """This rank's place on its node, from the variables torchrun sets."""
    try:
        return int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ConfigError("LOCAL_RANK and LOCAL_WORLD_SIZE are not set: start the ranks with torchrun") from None


def node_manager(config: Any, envs_per_rank: int, *, entry_spec: Optional[EntrySpec] = None,
                 enable_stats: bool = True) -> KVCacheManager:
    """The node's shared manager, on every rank: created by local rank 0 with
    ``envs_per_rank * LOCAL_WORLD_SIZE`` envs, attached by the other local ranks. A collective
    call: every rank of the job must call it (it creates one process group per node)."""
    import torch.distributed as dist

    positive_int("envs_per_rank", envs_per_rank)
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("node_manager needs torch.distributed initialised (init_process_group) first")
    local_rank, local_size = local_rank_and_size()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % local_size:
        raise ConfigError(f"world size {world} is not a multiple of LOCAL_WORLD_SIZE {local_size}")
    # torchrun numbers a node's ranks contiguously; every rank must create every node's group.
    groups = [dist.new_group(list(range(n * local_size, (n + 1) * local_size))) for n in range(world // local_size)]
    node = rank // local_size
    created: Optional[KVCacheManager] = None
    box: list = [None]
    if local_rank == 0:
        created = KVCacheManager(config, envs_per_rank * local_size, enable_stats, shared=True, entry_spec=entry_spec)
        box[0] = created.handle()
    dist.broadcast_object_list(box, src=node * local_size, group=groups[node])
    manager = created if created is not None else KVCacheManager.attach(box[0])
    dist.barrier(group=groups[node])  # every rank of the node holds the manager before any goes on
    return manager


def rank_collector(manager: KVCacheManager, envs_per_rank: int) -> CollectorCaches:
    """This rank's collector view of its node's manager (its own init pools)."""
    local_rank, _ = local_rank_and_size()
    positive_int("envs_per_rank", envs_per_rank)
    return manager.collector(local_rank * envs_per_rank, envs_per_rank)
