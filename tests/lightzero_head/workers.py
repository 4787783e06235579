"""A collector process for test_shared.py: builds the main-branch model, attached to a shared manager."""

from __future__ import annotations

from typing import Any


def collector(handle: Any, env_offset: int, seed: int, results: Any) -> None:
    """Run head_small's sequence in this process with init pools ``env_offset``.. of the shared
    manager behind ``handle``; put (weights digest, outputs as numpy, counters, pool stats, key sets)."""
    try:
        from concurrent_kv.integrations.lightzero_head import use_for_main_branch

        from . import head_small as H
        from .source import require_main_branch

        require_main_branch()
        use_for_main_branch(handle, env_offset=env_offset)
        model = H.build_model(seed=0)
        manager = model.world_model.kv_cache_manager
        res = H.run(model, seed=seed)
        outputs = [(name, t.numpy().copy()) for name, t in res.outputs]
        results.put((env_offset, H.weights_digest(model), outputs, res.counters, res.pool_stats, res.key_sets,
                     type(manager).__name__))
        manager.close()
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        results.put((env_offset, "error", traceback.format_exc(), None, None, None, repr(exc)))
