"""Slot storage: one preallocated tensor holding every slot of a pool.

``block`` has shape ``(capacity, 2 * layers, n, heads, max_tokens, head_dim)``: each slot is one
contiguous region, so a store or a read is a single ``copy_`` when the entry is one of our
:class:`~concurrent_kv.entry.KeysValues` (and one fused ``_foreach_copy_`` otherwise). Token counts
sit beside it. Storage knows nothing of keys, policies or locks: the pool decides which slot.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .entry import EntrySpec, KeysValues
from .cells import Cells

__all__ = ["SlotStorage"]

#: Token-prefix views kept per slot on average (UniZero reads and writes a handful of lengths).
_HEADS_KEPT = 8


class SlotStorage:
    """``capacity`` slots of entries shaped by ``spec``, allocated once."""

    def __init__(
        self,
        spec: EntrySpec,
        capacity: int,
        block: Optional[torch.Tensor] = None,
        sizes: Optional[Cells] = None,
    ) -> None:
        """``block`` and ``sizes`` (flat, ``2 * layers`` per slot) may be handed in, e.g. from
        shared memory; by default they are allocated here."""
        self.spec = spec
        self.capacity = capacity
        if block is None:
            block = torch.zeros((capacity, *spec.block_shape), dtype=spec.dtype, device=spec.device)
        self.block = block
        self._slots: List[torch.Tensor] = list(block.unbind(0))  # one view per slot, made once
        self._parts: List[Optional[List[torch.Tensor]]] = [None] * capacity  # per-tensor views, made on demand
        self._views: List[Optional[KeysValues]] = [None] * capacity  # lease views, made on demand
        self._heads: Dict[Tuple[int, int], torch.Tensor] = {}  # (slot, tokens) -> view, made on demand
        self._width = 2 * spec.num_layers
        self._sizes: Cells = [0] * (capacity * self._width) if sizes is None else sizes

    @property
    def nbytes(self) -> int:
        return self.block.numel() * self.block.element_size()

    def sizes(self, slot: int) -> Tuple[int, ...]:
        base = slot * self._width
        return tuple(self._sizes[base : base + self._width])

    def size(self, slot: int) -> int:
        """``slot``'s first token count (layer 0's K)."""
        return self._sizes[slot * self._width]

    def slot(self, slot: int, tokens: Optional[int] = None) -> torch.Tensor:
        """``slot``'s tensor ``(2 * layers, n, heads, max_tokens, head_dim)``, or its first
        ``tokens`` tokens of every cache (views made once; batched copies move only valid tokens)."""
        if tokens is None or tokens == self.spec.max_tokens:
            return self._slots[slot]
        view = self._heads.get((slot, tokens))
        if view is None:
            if len(self._heads) >= _HEADS_KEPT * self.capacity:  # long contexts: bounded, not every length
                self._heads.clear()
            view = self._heads[(slot, tokens)] = self._slots[slot][..., :tokens, :]
        return view

    def record_sizes(self, slot: int, sizes: Tuple[int, ...]) -> None:
        cells, i = self._sizes, slot * self._width
        for size in sizes:
            cells[i] = size
            i += 1

    def _give_sizes(self, slot: int, kv: Any) -> None:
        """Set ``kv``'s token counts to ``slot``'s (``kv`` has the spec's layer count)."""
        cells, i = self._sizes, slot * self._width
        for layer in kv._keys_values:
            layer._k_cache._size = cells[i]
            layer._v_cache._size = cells[i + 1]
            i += 2

    def write(self, slot: int, data: Union[torch.Tensor, List[torch.Tensor]], sizes: Tuple[int, ...]) -> None:
        """Deep-copy validated entry data (see ``EntrySpec.check``) into ``slot``."""
        if isinstance(data, torch.Tensor):
            self._slots[slot].copy_(data.detach() if data.requires_grad else data)
        else:  # checked tensors: detached where they needed it
            torch._foreach_copy_(self.parts(slot), data)
        self.record_sizes(slot, sizes)

    def parts(self, slot: int) -> List[torch.Tensor]:
        """``slot``'s K0, V0, K1, ... tensors (views made on first use)."""
        parts = self._parts[slot]
        if parts is None:
            parts = self._parts[slot] = list(self._slots[slot].unbind(0))
        return parts

    def read(self, slot: int, out: Optional[Any] = None, tensors: Optional[List[torch.Tensor]] = None) -> Any:
        """A private deep copy of ``slot``: a new :class:`KeysValues`, or copied into ``out``
        (already validated against the spec; ``tensors`` are its checked tensors, one per cache,
        when it is not one of our intact entries)."""
        if out is None:
            return KeysValues.from_block(self._slots[slot].clone(), self.sizes(slot))
        if tensors is None:
            target = out.block_if_intact()
            (target.detach() if target.requires_grad else target).copy_(self._slots[slot])
        else:
            torch._foreach_copy_(tensors, self.parts(slot))
        self._give_sizes(slot, out)
        return out

    def view(self, slot: int) -> KeysValues:
        """A zero-copy :class:`KeysValues` over ``slot``, valid while the slot is pinned.

        One view object per slot is made on first use and handed out again (building one costs
        ~3 us): each call points its caches back at the slot and refreshes their token counts.
        Concurrent leases of one slot share it, which is safe because a pinned slot never
        changes and lease holders only read.
        """
        kv = self._views[slot]
        if kv is None:
            kv = self._views[slot] = KeysValues.from_block(self._slots[slot], self.sizes(slot), self.parts(slot))
            return kv
        parts, cells, base = self.parts(slot), self._sizes, slot * self._width
        i = 0
        for layer in kv._keys_values:
            k, v = layer._k_cache, layer._v_cache
            k._cache, k._size = parts[i], cells[base + i]
            v._cache, v._size = parts[i + 1], cells[base + i + 1]
            i += 2
        return kv
