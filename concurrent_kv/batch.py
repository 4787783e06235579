"""Batched pool calls: many keys, one lock acquisition, one tensor operation.

:meth:`KVCachePool.lookup_many` returns a :class:`PinnedBatch`: every hit's slot pinned (never
evicted nor overwritten while pinned), so its tensor can be read without a lock, by one gather
over several slots (or several pools). :meth:`KVCachePool.write_many` returns a
:class:`WriteBatch`: a slot reserved per key, written by the caller (one scatter), then published
by :meth:`WriteBatch.commit` under one lock. ``get_many`` and ``set_many`` are built on them.

Why: a UniZero search step reads and writes one entry per environment. Per entry, a ``get`` or
``set`` costs a lock round trip and a tensor copy, each a few microseconds of fixed cost; per
batch, the fixed costs are paid once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import torch

from .entry import EntrySpec
from .errors import ClosedError, ConfigError, EntryMismatchError, InvalidEntryError, InvalidKeyError
from .keys import KEY_MAX, check_key

if TYPE_CHECKING:
    from .pool import KVCachePool
    from .storage import SlotStorage

__all__ = ["PinnedBatch", "WriteBatch", "check_keys", "check_sizes", "entries_data"]

SizesLike = Union[int, Sequence[int]]
_RELEASED = "this batch's pins were released: its slots may hold other entries now"


def check_keys(cache_keys: Any) -> List[int]:
    """Every key of a batch as a plain int (a list or tuple of keys), or the first bad key's
    :class:`InvalidKeyError` before anything is looked up or stored."""
    if not isinstance(cache_keys, (list, tuple)):
        raise InvalidKeyError(f"a batch of cache keys must be a list or tuple, got {type(cache_keys).__name__}")
    for k in cache_keys:  # the hot path: plain ints in range, taken as they are
        if type(k) is not int or not 0 <= k <= KEY_MAX:
            return [check_key(k) for k in cache_keys]
    return list(cache_keys)


def check_sizes(sizes: Any, count: int, width: int, top: int) -> List[Tuple[int, ...]]:
    """Token counts of ``count`` entries, each an int (every cache of the entry) or ``width``
    ints (K0, V0, K1, V1, ...), all in [0, top]; :class:`EntryMismatchError` otherwise."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) != count:
        raise EntryMismatchError(f"sizes must be a list of {count} token counts, got {sizes!r:.80}")
    out = []
    for s in sizes:
        if type(s) is int and 0 <= s <= top:  # the common case, checked first: this runs per batch
            out.append((s,) * width)
            continue
        row = (s,) * width if _is_int(s) else tuple(s) if isinstance(s, (list, tuple)) else ()
        if len(row) != width or not all(_is_int(x) and 0 <= x <= top for x in row):
            raise EntryMismatchError(f"an entry's size must be an int or {width} ints in [0, {top}], got {s!r:.80}")
        out.append(tuple(int(x) for x in row))
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t  # a detach is an op of its own: only when needed


EntryData = Union[torch.Tensor, List[torch.Tensor]]


def entries_data(spec: Optional[EntrySpec], entries: Any, sizes: Any,
                 count: int) -> Tuple[Optional[EntrySpec], List[EntryData], List[Tuple[int, ...]]]:
    """Validate a batch of entries for ``set_many``: the spec (the pool's, else the entries'),
    each entry's data (its block, or its K0, V0, ... tensors) and token counts."""
    if isinstance(entries, torch.Tensor):
        return _tensor_batch(spec, entries, sizes, count)
    if not isinstance(entries, (list, tuple)) or len(entries) != count:
        raise InvalidEntryError(f"entries must be a list of {count} entries or one tensor, got {type(entries).__name__}")
    if count and isinstance(entries[0], torch.Tensor):
        return _block_list(spec, entries, sizes, count)
    if sizes is not None:
        raise ConfigError("sizes= goes with tensors; entries carry their own token counts")
    if spec is None and count:
        spec = EntrySpec.of(entries[0])
    data: List[EntryData] = []
    rows: List[Tuple[int, ...]] = []
    for kv in entries:
        assert spec is not None
        d, s = spec.check(kv)
        data.append(_detached(d) if isinstance(d, torch.Tensor) else [_detached(t) for t in d])
        rows.append(s)
    return spec, data, rows


def _tensor_batch(spec: Optional[EntrySpec], block: torch.Tensor, sizes: Any,
                  count: int) -> Tuple[EntrySpec, List[EntryData], List[Tuple[int, ...]]]:
    """A batch as one tensor ``(count, 2 * layers, n, heads, tokens, head_dim)``: whole entries,
    or (with the pool's spec known) their first ``tokens`` tokens, at least the valid ones."""
    if spec is None:
        if block.dim() != 6 or block.shape[1] % 2:
            raise EntryMismatchError(f"a tensor batch is (count, 2 * layers, n, heads, tokens, head_dim), got {tuple(block.shape)}")
        _, width, n, heads, tokens, head_dim = block.shape
        spec = EntrySpec(width // 2, n, heads, tokens, head_dim, block.dtype, block.device)
    if sizes is None:
        raise EntryMismatchError("a tensor batch needs sizes= (each entry's token count)")
    rows = check_sizes(sizes, count, 2 * spec.num_layers, spec.max_tokens)
    full = (count, *spec.block_shape)
    shape = block.shape
    if len(shape) != 6 or shape[:4] != full[:4] or shape[5] != full[5] or not shape[4] <= spec.max_tokens \
            or any(max(row) > shape[4] for row in rows) or block.dtype is not spec.dtype \
            or not spec.holds_device(block):
        raise EntryMismatchError(f"the batch is {tuple(shape)} {block.dtype} on {block.device}; the pool needs "
                                 f"{full} {spec.dtype} on {spec.device} (or its first tokens, at least the valid ones)")
    return spec, list(_detached(block).unbind(0)), rows


def _block_list(spec: Optional[EntrySpec], blocks: Sequence[Any], sizes: Any,
                count: int) -> Tuple[EntrySpec, List[EntryData], List[Tuple[int, ...]]]:
    """Entries given as tensors ``(2 * layers, n, heads, tokens, head_dim)``, each holding the
    first ``tokens`` tokens of every cache (at least the entry's token counts): the slot's
    prefix is written, the rest of it is left as it was."""
    if spec is None:  # a prefix does not say how many tokens a slot holds
        raise EntryMismatchError("the pool has no slots yet: pass entry_spec= with entries given as tensors")
    if sizes is None:
        raise EntryMismatchError("entries given as tensors need sizes= (each entry's token count)")
    rows = check_sizes(sizes, count, 2 * spec.num_layers, spec.max_tokens)
    width, n, heads, top, head_dim = spec.block_shape
    dtype = spec.dtype
    data: List[EntryData] = []
    for block, row in zip(blocks, rows):
        shape = block.shape if type(block) is torch.Tensor else ()
        if len(shape) != 5 or shape[0] != width or shape[1] != n or shape[2] != heads or shape[4] != head_dim \
                or not max(row) <= shape[3] <= top or block.dtype is not dtype or not spec.holds_device(block):
            raise EntryMismatchError(
                f"an entry tensor is {tuple(getattr(block, 'shape', ()))} {getattr(block, 'dtype', type(block))}; "
                f"the slots hold {spec.block_shape} {spec.dtype} on {spec.device}, and an entry's tensor must hold "
                f"its {max(row)} valid tokens")
        data.append(block.detach() if block.requires_grad else block)
    return spec, data, rows


class PinnedBatch:
    """The slots of a batch of keys, pinned until :meth:`release` (or the ``with`` block ends).

    ``slots[i]`` is the slot of ``keys[i]``, or -1 on a miss. :meth:`view` is the slot's tensor
    ``(2 * layers, n, heads, max_tokens, head_dim)`` itself: read it, never write it.
    """

    __slots__ = ("keys", "slots", "hits", "_pool", "_storage", "_released")

    def __init__(self, pool: "KVCachePool", keys: List[int], slots: List[int], hits: int,
                 storage: Optional["SlotStorage"]) -> None:
        self.keys, self.slots, self.hits = keys, slots, hits
        self._pool, self._storage = pool, storage
        self._released = not hits

    def _slot(self, i: int) -> int:
        slot = self.slots[i]
        if slot < 0:
            raise KeyError(f"key {self.keys[i]} (position {i}) missed")
        if self._released:
            raise ClosedError(_RELEASED)
        return slot

    def view(self, i: int, tokens: Optional[int] = None) -> torch.Tensor:
        """Position ``i``'s slot tensor, or its first ``tokens`` tokens (zero-copy; valid until
        release)."""
        slot = self.slots[i]
        if slot < 0 or self._released:  # the hot path checks inline; _slot says what is wrong
            slot = self._slot(i)
        assert self._storage is not None
        return self._storage.slot(slot, tokens)

    def sizes(self, i: int) -> Tuple[int, ...]:
        """Position ``i``'s token counts (K0, V0, K1, V1, ...)."""
        assert self._storage is not None
        return self._storage.sizes(self._slot(i))

    def size(self, i: int) -> int:
        """Position ``i``'s first token count (layer 0's K: LightZero's ``KeysValues.size``)."""
        assert self._storage is not None
        return self._storage.size(self._slot(i))

    def first_sizes(self) -> List[int]:
        """Every position's first token count (as :meth:`size`), -1 for a miss: one call per batch."""
        if self._released and self.hits:
            raise ClosedError(_RELEASED)
        storage = self._storage
        return [-1 if slot < 0 or storage is None else storage.size(slot) for slot in self.slots]

    def entry(self, i: int) -> Any:
        """Position ``i`` as a zero-copy :class:`~concurrent_kv.entry.KeysValues` (read only)."""
        assert self._storage is not None
        return self._storage.view(self._slot(i))

    def release(self) -> None:
        """Unpin every hit (idempotent). The slots may be reused at once after this."""
        if not self._released:
            self._released = True
            self._pool._unpin_many([s for s in self.slots if s >= 0])

    def __enter__(self) -> "PinnedBatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PinnedBatch({self.hits}/{len(self.keys)} hits, {'released' if self._released else 'pinned'})"


class WriteBatch:
    """Slots reserved for a batch of keys: write each one's :meth:`view`, then :meth:`commit`.

    ``slots[i]`` is where ``keys[i]`` will be stored, or -1 when the store was refused (the pool
    was full of pinned or held slots, ``partial=True``). A key given twice is stored once, from
    its last position: :meth:`view` is None for refused positions and earlier duplicates, so a
    caller writes exactly the views that are not None. Until the commit, readers see the keys'
    old entries (or miss); on :meth:`abort` (or an exception in the ``with`` block) nothing is
    stored and the reserved slots are free again.
    """

    __slots__ = ("keys", "slots", "refused", "_pool", "_storage", "_sizes", "_priority", "_holder", "_last",
                 "_writes", "_open")

    def __init__(self, pool: "KVCachePool", keys: List[int], slots: List[int], sizes: List[Tuple[int, ...]],
                 priority: float, holder: Optional[int], storage: Optional["SlotStorage"], distinct: bool) -> None:
        self.keys, self.slots = keys, slots
        self._pool, self._storage, self._sizes = pool, storage, sizes
        self._priority, self._holder = priority, holder
        self.refused = slots.count(-1)
        if distinct and not self.refused:  # every key once, all reserved: the common case
            self._last = list(range(len(keys)))
        else:
            last = {k: i for i, k in enumerate(keys)}
            self._last = [i for i, k in enumerate(keys) if last[k] == i and slots[i] >= 0]
        self._writes = set(self._last)
        self._open = True

    @property
    def pool(self) -> "KVCachePool":
        return self._pool

    def positions(self) -> List[int]:
        """The positions to write, in order: one per stored key (its last position)."""
        return list(self._last)

    def view(self, i: int, tokens: Optional[int] = None) -> Optional[torch.Tensor]:
        """Position ``i``'s reserved slot tensor to write (or its first ``tokens`` tokens), or
        None (refused, or a duplicate)."""
        if not self._open:
            raise ClosedError("this batch was committed or aborted")
        if i not in self._writes:
            return None
        assert self._storage is not None
        return self._storage.slot(self.slots[i], tokens)

    def parts(self, i: int) -> List[torch.Tensor]:
        """Position ``i``'s slot as its K0, V0, K1, ... tensors (views made once per slot)."""
        if self.view(i) is None:
            raise KeyError(f"position {i} has nothing to write")
        assert self._storage is not None
        return self._storage.parts(self.slots[i])

    def commit(self) -> List[int]:
        """Publish every written slot under one lock; return ``slots``. Keys stored before get
        the new entries (their old slots are freed). Raises :class:`ClosedError` (nothing
        stored) if the pool was closed meanwhile."""
        if not self._open:
            raise ClosedError("this batch was committed or aborted")
        self._open = False
        last = self._last
        for i in last:
            assert self._storage is not None
            self._storage.record_sizes(self.slots[i], self._sizes[i])
        if not self._pool._end_writes([self.slots[i] for i in last], [self.keys[i] for i in last],
                                      self._priority, self._holder):
            raise ClosedError(f"pool {self._pool.name!r} was closed during write_many")
        return self.slots

    def abort(self) -> None:
        """Store nothing; hand the reserved slots back (idempotent)."""
        if self._open:
            self._open = False
            self._pool._end_writes([self.slots[i] for i in self._last], None, 0.0, None)

    def __enter__(self) -> "WriteBatch":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self._open:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"WriteBatch({len(self._last)} to store, {self.refused} refused, {'open' if self._open else 'closed'})"
