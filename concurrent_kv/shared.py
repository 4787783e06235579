"""Setting a pool up in shared memory: create it, attach to it, join it as a worker, fork safely.

A shared pool is two segments (:class:`~concurrent_kv.shm.Segment`): *meta* (the metadata of
:class:`~concurrent_kv.state.SharedState`, laid out by :class:`~concurrent_kv.state.MetaLayout`)
and *data* (the slot tensor). :func:`create` makes both and :func:`attach` opens them from a
:class:`PoolHandle`; each returns the same :class:`SharedParts`, so the pool assembles itself one
way whichever side it is on. The segments own their files: the creator's :meth:`SharedParts.close`
unlinks both, an attached worker's only unmaps.

A meta segment starts with a *description* of its pool (:func:`describe`): the handle's layout
fields, the data segment's name, the id of the manager it belongs to (:func:`grouped`) and its
creation time, as JSON, so that ``concurrent-kv shm list`` can read a pool without its handle
(:func:`read_description`).

A process takes part in a pool through a *worker row* (its pins and counters): :func:`join` claims
one, reclaiming a dead worker's row if that is the free one. A forked child never inherits its
parent's row nor its ownership of the files: the fork hook below hands every open shared pool to
its ``_after_fork``, and the child joins on its first call.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import time
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Tuple, Type

import torch

from .entry import EntrySpec
from .errors import ConfigError
from .eviction import EvictionPolicy, resolve_policy
from .locks import ProcessLock, Releasable
from .shm import KIND_DATA, KIND_META, PREFIX, AttachError, Segment
from .slots import SlotTable
from .state import DESCRIPTION_BYTES, MetaLayout, SharedState
from .storage import SlotStorage

__all__ = [
    "PoolHandle", "SharedParts", "PoolDescription", "create", "attach", "join", "grouped", "describe",
    "read_description", "track_forks", "untrack_forks",
]


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


# -- the description at the start of a meta segment --------------------------------------------

_GROUP: "contextvars.ContextVar[str]" = contextvars.ContextVar("concurrent_kv_pool_group", default="")
_NAME_CHARS = 256  # of a pool's name kept in its description: for display only


@contextlib.contextmanager
def grouped(group: str) -> Iterator[None]:
    """Pools created inside the block record ``group`` (a manager's id) in their description,
    so ``shm list`` shows the pools of one manager together."""
    if not isinstance(group, str) or not group.isalnum() or len(group) > 32:
        raise ConfigError(f"a pool group must be 1 to 32 letters or digits, got {group!r}")
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


@dataclass(frozen=True)
class PoolDescription:
    """What a meta segment says about its pool: the handle (paths in the segment's folder), the
    manager it belongs to ("" for a pool on its own) and when it was created (Unix time)."""

    handle: PoolHandle
    manager: str
    created: float


def describe(handle: PoolHandle, manager: str, created: float) -> bytes:
    """The description of ``handle``'s pool, as the first bytes of its meta segment."""
    fields = {
        "name": handle.name[:_NAME_CHARS], "data": os.path.basename(handle.data_path), "capacity": handle.capacity,
        "policy": handle.policy, "spec": list(handle.spec), "max_workers": handle.max_workers, "lock": handle.lock,
        "lock_timeout": handle.lock_timeout, "enable_stats": handle.enable_stats, "manager": manager,
        "created": created,
    }
    raw = json.dumps(fields, separators=(",", ":")).encode()
    if len(raw) > DESCRIPTION_BYTES:
        raise ConfigError(f"pool {handle.name[:40]!r}: its description takes {len(raw)} bytes, at most "
                          f"{DESCRIPTION_BYTES} fit (a policy or lock name too long?)")
    return raw.ljust(DESCRIPTION_BYTES, b"\0")


_FIELD_TYPES: Dict[str, Tuple[type, ...]] = {
    "name": (str,), "data": (str,), "capacity": (int,), "policy": (str,), "spec": (list,),
    "max_workers": (int,), "lock": (str,), "lock_timeout": (int, float), "enable_stats": (bool,),
    "manager": (str,), "created": (int, float),
}


def read_description(raw: bytes, meta_path: str) -> PoolDescription:
    """Decode the description of the meta segment at ``meta_path``; :class:`AttachError` for
    anything :func:`describe` did not write (it is read from a file: trust nothing)."""
    try:
        fields = json.loads(bytes(raw[:DESCRIPTION_BYTES]).rstrip(b"\0").decode())
    except (UnicodeDecodeError, ValueError):
        raise AttachError(f"{meta_path!r}: its pool description is not readable") from None
    if not isinstance(fields, dict) or set(fields) != set(_FIELD_TYPES) or not all(
        isinstance(fields[k], t) and not (isinstance(fields[k], bool) and bool not in t)
        for k, t in _FIELD_TYPES.items()
    ):
        raise AttachError(f"{meta_path!r}: its pool description lacks fields or has wrong types")
    spec = fields["spec"]
    if not (len(spec) == 6 and all(type(d) is int and d > 0 for d in spec[:5]) and isinstance(spec[5], str)):
        raise AttachError(f"{meta_path!r}: its pool description has a bad entry shape {spec!r}")
    data = fields["data"]
    if os.path.basename(data) != data or not data.startswith(PREFIX):  # never a path elsewhere
        raise AttachError(f"{meta_path!r}: its pool description names a foreign data file {data!r}")
    if fields["capacity"] <= 0 or fields["max_workers"] <= 0 or not math.isfinite(fields["created"]):
        raise AttachError(f"{meta_path!r}: its pool description has out-of-range numbers")
    handle = PoolHandle(
        fields["name"], meta_path, os.path.join(os.path.dirname(meta_path), data), fields["capacity"],
        fields["policy"], tuple(spec), fields["max_workers"], fields["lock"],  # type: ignore[arg-type]
        float(fields["lock_timeout"]), fields["enable_stats"],
    )
    return PoolDescription(handle, fields["manager"], float(fields["created"]))


# -- creating and attaching ---------------------------------------------------------------------


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
    with ExitStack() as undo:  # a failure leaves no segment behind
        data = Segment.create(name + ".data", capacity * spec.nbytes, MetaLayout.data_digest(capacity, spec), KIND_DATA)
        undo.callback(data.close)
        meta = Segment.create(name, layout.payload_bytes, layout.digest(), KIND_META)
        undo.callback(meta.close)
        handle = PoolHandle(
            name, meta.path, data.path, capacity, policy_cls.name,
            (spec.num_layers, spec.num_samples, spec.num_heads, spec.max_tokens, spec.head_dim, str(spec.dtype)),
            max_workers, lock, lock_timeout, enable_stats,
        )
        region = layout.regions["description"]
        meta.view(region.offset, region.nbytes)[:] = describe(handle, _GROUP.get(), time.time())
        parts = _open(handle, meta, data, policy_cls, layout, create=True)
        undo.pop_all()
    return parts


def attach(handle: Any) -> SharedParts:
    """Open the segments behind ``handle``, checking each header against the handle's layout."""
    if not isinstance(handle, PoolHandle):
        raise AttachError(f"attach expects a PoolHandle, got {type(handle).__name__}")
    spec = handle.entry_spec()
    policy_cls = resolve_policy(handle.policy)
    layout = MetaLayout(handle.capacity, policy_cls, spec, handle.max_workers)
    with ExitStack() as undo:  # a failure leaves nothing mapped
        data = Segment.attach(handle.data_path, handle.capacity * spec.nbytes,
                              MetaLayout.data_digest(handle.capacity, spec))
        undo.callback(data.close)
        meta = Segment.attach(handle.meta_path, layout.payload_bytes, layout.digest())
        undo.callback(meta.close)
        try:
            parts = _open(handle, meta, data, policy_cls, layout, create=False)
        except (OSError, RuntimeError):
            if not (os.path.exists(handle.meta_path) and os.path.exists(handle.data_path)):
                # torch and the lock open the files by name: the owner removed them meanwhile
                raise AttachError(f"pool {handle.name!r} was removed while attaching (its owner is gone)") from None
            raise
        undo.pop_all()
    return parts


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
