"""Setting a pool up in shared memory: create it, attach to it, join it as a worker, fork safely.

A shared pool is two segments (:class:`~concurrent_kv.shm.Segment`): *meta* (the metadata of
:class:`~concurrent_kv.state.SharedState`, laid out by :class:`~concurrent_kv.state.MetaLayout`)
and *data* (the slot tensor). :func:`create` makes both and :func:`attach` opens them from a
:class:`PoolHandle`; each returns the same :class:`SharedParts`, so the pool assembles itself one
way whichever side it is on. The segments own their files: the creator's :meth:`SharedParts.close`
unlinks both, an attached worker's only unmaps.

A process takes part in a pool through a *worker row* (its pins and counters): :func:`join` claims
one, reclaiming a dead worker's row if that is the free one. A forked child never inherits its
parent's row nor its ownership of the files: the fork hook below hands every open shared pool to
its ``_after_fork``, and the child joins on its first call.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Tuple, Type

import torch

from .entry import EntrySpec
from .eviction import EvictionPolicy, resolve_policy
from .locks import ProcessLock, Releasable
from .shm import KIND_DATA, KIND_META, AttachError, Segment
from .slots import SlotTable
from .state import MetaLayout, SharedState
from .storage import SlotStorage

__all__ = ["PoolHandle", "SharedParts", "create", "attach", "join", "track_forks", "untrack_forks"]


@dataclass(frozen=True)
class PoolHandle:
    """What a worker process needs to attach to a shared pool: names and layout, no data."""

    name: str
    meta_path: str
    data_path: str
    capacity: int
    policy: str
    spec: Tuple[int, int, int, int, int, str]  # layers, n, heads, max_tokens, head_dim, dtype
    max_workers: int
    lock: str
    lock_timeout: float
    enable_stats: bool

    def entry_spec(self) -> EntrySpec:
        layers, n, heads, tokens, head_dim, dtype = self.spec
        return EntrySpec(layers, n, heads, tokens, head_dim, dtype=getattr(torch, dtype.replace("torch.", "")))


@dataclass
class SharedParts:
    """A shared pool's pieces in this process: metadata, slot storage, lock, handle, segments."""

    state: SharedState
    storage: SlotStorage
    lock: ProcessLock
    handle: PoolHandle
    data: Segment

    def close(self) -> None:
        """Unmap both segments; the creating process also unlinks them."""
        self.state.close()
        self.lock.close()
        self.data.close()


def _open(handle: PoolHandle, meta: Segment, data: Segment, policy_cls: Type[EvictionPolicy],
          layout: MetaLayout, create: bool) -> SharedParts:
    spec = handle.entry_spec()
    state = SharedState(meta, layout, policy_cls, create)
    block = data.tensor(spec.dtype, (handle.capacity, *spec.block_shape))
    storage = SlotStorage(spec, handle.capacity, block=block, sizes=state.sizes)
    return SharedParts(state, storage, ProcessLock(meta.path, handle.lock, handle.name), handle, data)


def create(name: str, capacity: int, policy_cls: Type[EvictionPolicy], spec: EntrySpec, lock: str,
           max_workers: int, lock_timeout: float, enable_stats: bool) -> SharedParts:
    """Create a pool's two segments (data first: it is the big one, so a full tmpfs fails before
    any metadata is laid out) and open them."""
    layout = MetaLayout(capacity, policy_cls, spec, max_workers)
    data = Segment.create(name + ".data", capacity * spec.nbytes, MetaLayout.data_digest(capacity, spec), KIND_DATA)
    try:
        meta = Segment.create(name, layout.payload_bytes, layout.digest(), KIND_META)
    except BaseException:
        data.close()
        raise
    handle = PoolHandle(
        name, meta.path, data.path, capacity, policy_cls.name,
        (spec.num_layers, spec.num_samples, spec.num_heads, spec.max_tokens, spec.head_dim, str(spec.dtype)),
        max_workers, lock, lock_timeout, enable_stats,
    )
    try:
        return _open(handle, meta, data, policy_cls, layout, create=True)
    except BaseException:
        meta.close()
        data.close()
        raise


def attach(handle: Any) -> SharedParts:
    """Open the segments behind ``handle``, checking each header against the handle's layout."""
    if not isinstance(handle, PoolHandle):
        raise AttachError(f"attach expects a PoolHandle, got {type(handle).__name__}")
    spec = handle.entry_spec()
    policy_cls = resolve_policy(handle.policy)
    layout = MetaLayout(handle.capacity, policy_cls, spec, handle.max_workers)
    data = Segment.attach(handle.data_path, handle.capacity * spec.nbytes,
                          MetaLayout.data_digest(handle.capacity, spec))
    try:
        meta = Segment.attach(handle.meta_path, layout.payload_bytes, layout.digest())
    except BaseException:
        data.close()
        raise
    try:
        return _open(handle, meta, data, policy_cls, layout, create=False)
    except BaseException as exc:
        meta.close()
        data.close()
        gone = not (os.path.exists(handle.meta_path) and os.path.exists(handle.data_path))
        if isinstance(exc, (OSError, RuntimeError)) and gone:  # torch and the lock open the files by name
            raise AttachError(f"pool {handle.name!r} was removed while attaching (its owner is gone)") from None
        raise


def join(parts: SharedParts, slots: SlotTable, timeout: float) -> None:
    """Claim a worker row for this process; if it was a dead worker's, its pins were just
    dropped, so the slots they held are swept back."""
    held: Releasable = parts.lock.acquire_write(timeout)
    try:
        if parts.state.claim_worker():
            slots.sweep()
    finally:
        held.release()


# -- fork safety ------------------------------------------------------------------------------

_open_pools: "weakref.WeakSet[Any]" = weakref.WeakSet()


def track_forks(pool: Any) -> None:
    """Call ``pool._after_fork()`` in every child forked while ``pool`` is open."""
    _open_pools.add(pool)


def untrack_forks(pool: Any) -> None:
    _open_pools.discard(pool)


def _after_fork_in_child() -> None:
    for pool in list(_open_pools):
        pool._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
