"""A ``KeysValues``-compatible entry type, and helpers that read any ``KeysValues``-like object.

:class:`KeysValues` mirrors LightZero's ``kv_caching`` classes (``KeysValues`` -> ``KVCache`` ->
``Cache``) attribute for attribute (``_keys_values[l]._k_cache._cache``, ``._size``, ...), so world
model code runs on it unchanged. One difference: all layers' K and V live in **one contiguous
block** ``(2 * layers, n, heads, max_tokens, head_dim)`` and each ``Cache._cache`` starts as a view
into it, so copying a whole entry is one tensor operation instead of ``2 * layers``. Code may still
replace ``_cache`` with any tensor (LightZero does); the entry then simply takes the slower path.

Pools also accept LightZero's own ``KeysValues``: they are read by duck typing, and lightzero is
never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .checks import positive_int
from .errors import EntryMismatchError, InvalidEntryError

__all__ = ["Cache", "KVCache", "KeysValues", "EntrySpec", "entry_tensors"]


class _AssignWithoutInplaceCheck(torch.autograd.Function):
    """Slice assignment that bypasses autograd's version check (LightZero's ``update`` needs it)."""

    @staticmethod
    def forward(ctx: Any, target: torch.Tensor, value: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        ctx.start, ctx.stop = start, stop
        target.data[:, :, start:stop] = value
        return target

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return grad, grad[:, :, ctx.start : ctx.stop], None, None


class Cache:
    """One K or V tensor ``(n, heads, max_tokens, head_dim)`` and its valid-token count ``_size``."""

    def __init__(
        self,
        num_samples: int,
        num_heads: int,
        max_tokens: int,
        embed_dim: int,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        _storage: Optional[torch.Tensor] = None,
    ) -> None:
        if embed_dim % num_heads != 0:
            raise EntryMismatchError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self._num_samples = num_samples
        self._num_heads = num_heads
        self._max_tokens = max_tokens
        self._head_dim = embed_dim // num_heads
        self._device = torch.device(device)
        self._dtype = dtype
        self._home = _storage  # the block view this cache owns; reset() returns to it
        self._cache: torch.Tensor = self._fresh()
        self._size = 0

    def _fresh(self) -> torch.Tensor:
        if self._home is not None and self._home.shape[0] == self._num_samples:
            return self._home
        return torch.zeros(
            self._num_samples, self._num_heads, self._max_tokens, self._head_dim, device=self._device, dtype=self._dtype
        )

    @classmethod
    def _wrap(cls, home: torch.Tensor, size: int) -> "Cache":
        """A cache over an existing ``(n, heads, T, head_dim)`` view, without allocating."""
        cache = cls.__new__(cls)
        cache._num_samples, cache._num_heads, cache._max_tokens, cache._head_dim = home.shape
        cache._device = home.device
        cache._dtype = home.dtype
        cache._home = home
        cache._cache = home
        cache._size = size
        return cache

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(n, heads, valid tokens, head_dim)``."""
        return self._num_samples, self._num_heads, self._size, self._head_dim

    def reset(self) -> None:
        """Forget every token (the storage is kept)."""
        self._cache = self._fresh()
        self._size = 0

    def prune(self, mask: np.ndarray) -> None:
        """Keep only the samples where ``mask`` is true."""
        if not (mask.ndim == 1 and mask.shape[0] == self._num_samples):
            raise EntryMismatchError("mask must be 1-D with one element per sample")
        self._cache = self._cache[mask]
        self._num_samples = self._cache.shape[0]

    def get(self) -> torch.Tensor:
        """The valid tokens, as a view ``(n, heads, _size, head_dim)``."""
        return self._cache[:, :, : self._size, :]

    def update(self, x: torch.Tensor, tokens: int) -> None:
        """Append ``tokens`` tokens; on overflow drop an even number of the oldest (LightZero's rule)."""
        required = self._size + tokens
        if required > self._max_tokens:
            shift = required - self._max_tokens
            if shift % 2:
                shift += 1
            if shift >= self._size:
                self._cache.zero_()
                self._size = 0
            else:
                self._cache[:, :, : self._size - shift, :] = self._cache[:, :, shift : self._size, :].clone()
                self._size -= shift
        updated = _AssignWithoutInplaceCheck.apply(self._cache, x, self._size, self._size + tokens)
        home = self._home
        if home is not None and updated.grad_fn is None and updated.data_ptr() == home.data_ptr():
            updated = home  # same memory, no graph: keep the block intact (one-copy stores)
        self._cache = updated
        self._size += tokens


class KVCache:
    """The K and V caches of one attention layer."""

    def __init__(
        self,
        num_samples: int,
        num_heads: int,
        max_tokens: int,
        embed_dim: int,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        _storage: Optional[torch.Tensor] = None,
    ) -> None:
        k_home, v_home = (None, None) if _storage is None else (_storage[0], _storage[1])
        self._k_cache = Cache(num_samples, num_heads, max_tokens, embed_dim, device, dtype, _storage=k_home)
        self._v_cache = Cache(num_samples, num_heads, max_tokens, embed_dim, device, dtype, _storage=v_home)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self._k_cache.shape

    def reset(self) -> None:
        self._k_cache.reset()
        self._v_cache.reset()

    def prune(self, mask: np.ndarray) -> None:
        self._k_cache.prune(mask)
        self._v_cache.prune(mask)

    def get(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._k_cache.get(), self._v_cache.get()

    def update(self, k: torch.Tensor, v: torch.Tensor) -> None:
        tokens = k.size(2)
        self._k_cache.update(k, tokens)
        self._v_cache.update(v, tokens)


class KeysValues:
    """Per-layer K/V caches of a transformer, stored in one contiguous block.

    Same constructor as LightZero's: ``KeysValues(n, num_heads, max_tokens, embed_dim,
    num_layers, device)``; ``dtype`` is an extra keyword (LightZero always uses float32).
    """

    def __init__(
        self,
        num_samples: int,
        num_heads: int,
        max_tokens: int,
        embed_dim: int,
        num_layers: int,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        _block: Optional[torch.Tensor] = None,
    ) -> None:
        head_dim = embed_dim // num_heads
        if _block is None:
            _block = torch.zeros(
                2 * num_layers, num_samples, num_heads, max_tokens, head_dim, device=torch.device(device), dtype=dtype
            )
        self._block = _block
        self._keys_values = tuple(
            KVCache(num_samples, num_heads, max_tokens, embed_dim, device, dtype, _storage=_block[2 * i : 2 * i + 2])
            for i in range(num_layers)
        )

    @classmethod
    def from_block(
        cls, block: torch.Tensor, sizes: Sequence[int], parts: Optional[Sequence[torch.Tensor]] = None
    ) -> "KeysValues":
        """Wrap ``block`` ``(2*layers, n, heads, T, head_dim)`` without copying; ``sizes`` gives
        each cache's ``_size`` in K0, V0, K1, V1, ... order; ``parts`` may pass ``block.unbind(0)``
        when the caller already has it (tensor views cost about a microsecond each)."""
        if parts is None:
            parts = block.unbind(0)
        kv = cls.__new__(cls)
        kv._block = block
        layers = []
        for i in range(0, len(parts), 2):
            layer = KVCache.__new__(KVCache)
            layer._k_cache = Cache._wrap(parts[i], sizes[i])
            layer._v_cache = Cache._wrap(parts[i + 1], sizes[i + 1])
            layers.append(layer)
        kv._keys_values = tuple(layers)
        return kv

    def _caches(self) -> List[Cache]:
        out: List[Cache] = []
        for layer in self._keys_values:
            out.append(layer._k_cache)
            out.append(layer._v_cache)
        return out

    def block_if_intact(self) -> Optional[torch.Tensor]:
        """The contiguous block, if every cache still points at its part of it."""
        for layer in self._keys_values:
            if layer._k_cache._cache is not layer._k_cache._home or layer._v_cache._cache is not layer._v_cache._home:
                return None
        return self._block

    def __getitem__(self, index: int) -> KVCache:
        return self._keys_values[index]

    def __len__(self) -> int:
        return len(self._keys_values)

    @property
    def size(self) -> int:
        """Valid tokens of layer 0's K cache (LightZero's definition)."""
        return self._keys_values[0].shape[2] if self._keys_values else 0

    def reset(self) -> None:
        for layer in self._keys_values:
            layer.reset()

    def prune(self, mask: np.ndarray) -> None:
        for layer in self._keys_values:
            layer.prune(mask)

    def remove_register_tokens(self, register_token_num: int) -> None:
        """Hide the last ``register_token_num`` tokens of every cache (sizes only)."""
        if register_token_num <= 0:
            return
        for cache in self._caches():
            cache._size = max(0, cache._size - register_token_num)

    def clone(self) -> "KeysValues":
        """A deep copy in one contiguous block, keeping dtype and device."""
        tensors, sizes = entry_tensors(self)
        block = self._block if self.block_if_intact() is not None else torch.stack(tensors)
        return KeysValues.from_block(block.detach().clone(), sizes)

    def __repr__(self) -> str:
        spec = EntrySpec.of(self)
        return f"KeysValues(layers={spec.num_layers}, shape={spec.layer_shape}, size={self.size}, dtype={spec.dtype})"


def entry_tensors(kv: Any) -> Tuple[List[torch.Tensor], Tuple[int, ...]]:
    """The K0, V0, K1, V1, ... tensors and their ``_size`` of any ``KeysValues``-like object.

    Raises :class:`InvalidEntryError` when ``kv`` lacks LightZero's attribute surface.
    """
    try:
        layers = kv._keys_values
        caches = [c for layer in layers for c in (layer._k_cache, layer._v_cache)]
        tensors = [c._cache for c in caches]
        sizes = tuple(c._size for c in caches)
    except (AttributeError, TypeError):
        raise InvalidEntryError(
            f"expected a KeysValues-like entry (._keys_values[l]._k_cache._cache / ._size), got {type(kv).__name__}"
        ) from None
    if not caches:
        raise InvalidEntryError("a KeysValues entry needs at least one layer")
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise InvalidEntryError(f"cache tensors must be torch.Tensor, got {type(t).__name__}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise InvalidEntryError(f"cache _size must be an int, got {type(s).__name__}")
    return tensors, sizes


@dataclass(frozen=True)
class EntrySpec:
    """The shape of every entry in a pool: ``num_layers`` layers of K and V, each
    ``(num_samples, num_heads, max_tokens, head_dim)`` of ``dtype`` on ``device``."""

    num_layers: int
    num_samples: int
    num_heads: int
    max_tokens: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    _block_shape: torch.Size = field(init=False, repr=False, compare=False)  # derived, for the hot paths
    _layer_size: torch.Size = field(init=False, repr=False, compare=False)
    _on_cpu: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_samples", "num_heads", "max_tokens", "head_dim"):
            positive_int(f"EntrySpec.{name}", getattr(self, name), EntryMismatchError)
        if not isinstance(self.dtype, torch.dtype):
            raise EntryMismatchError(f"EntrySpec.dtype must be a torch.dtype, got {self.dtype!r}")
        if isinstance(self.device, bool) or not isinstance(self.device, (str, int, torch.device)):
            raise EntryMismatchError(f"EntrySpec.device must be a torch.device, str or int, got {self.device!r}")
        try:
            device = torch.device(self.device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())  # tensors report an index
        except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
            raise EntryMismatchError(f"EntrySpec.device must name a usable torch device, got {self.device!r}: {exc}") from None
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "_block_shape", torch.Size((2 * self.num_layers, *self.layer_shape)))
        object.__setattr__(self, "_layer_size", torch.Size(self.layer_shape))
        object.__setattr__(self, "_on_cpu", device.type == "cpu")

    @classmethod
    def of(cls, kv: Any) -> "EntrySpec":
        """The spec of an existing entry (its layer-0 K tensor decides)."""
        tensors, _ = entry_tensors(kv)
        first = tensors[0]
        if first.dim() != 4:
            raise EntryMismatchError(f"cache tensors must be 4-D (n, heads, tokens, head_dim), got {tuple(first.shape)}")
        n, heads, tokens, head_dim = first.shape
        return cls(len(tensors) // 2, n, heads, tokens, head_dim, first.dtype, first.device)

    @classmethod
    def for_transformer(cls, config: Any, device: Any = "cpu") -> Optional["EntrySpec"]:
        """UniZero's entry shape from a transformer config (an object or a dict with
        ``num_layers``, ``num_heads``, ``embed_dim`` and ``context_length``): one sample, float32,
        ``head_dim = embed_dim // num_heads``. None when a field is missing or None."""
        def read(name: str) -> Any:
            return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

        layers, heads, embed, context = (read(f) for f in ("num_layers", "num_heads", "embed_dim", "context_length"))
        if layers is None or heads is None or embed is None or context is None:
            return None
        return cls(layers, 1, heads, context, embed // heads, device=device)

    @property
    def layer_shape(self) -> Tuple[int, int, int, int]:
        return (self.num_samples, self.num_heads, self.max_tokens, self.head_dim)

    @property
    def block_shape(self) -> Tuple[int, ...]:
        return tuple(self._block_shape)

    def own_block(self, kv: Any) -> Optional[torch.Tensor]:
        """``kv``'s block when it is one of our intact :class:`KeysValues` of this spec, else None
        (the hot path of reads into ``out=``: the token counts are about to be overwritten)."""
        if type(kv) is not KeysValues:
            return None
        block = kv.block_if_intact()
        if block is None or block.shape != self._block_shape or block.dtype != self.dtype \
                or block.device != self.device:
            return None
        return block

    @property
    def nbytes(self) -> int:
        """Bytes of one entry's tensors."""
        count = 2 * self.num_layers
        for d in self.layer_shape:
            count *= d
        return count * torch.empty((), dtype=self.dtype).element_size()

    def empty_entry(self) -> KeysValues:
        """A zeroed :class:`KeysValues` of this spec."""
        return KeysValues(
            self.num_samples,
            self.num_heads,
            self.max_tokens,
            self.num_heads * self.head_dim,
            self.num_layers,
            self.device,
            self.dtype,
        )

    def check(self, kv: Any) -> Tuple[Union[torch.Tensor, List[torch.Tensor]], Tuple[int, ...]]:
        """Validate ``kv`` against this spec; return its data and sizes.

        The data is the entry's contiguous block when it is one of our intact
        :class:`KeysValues` (one copy moves it), else its list of K0, V0, K1, V1, ... tensors.
        Raises :class:`InvalidEntryError` or :class:`EntryMismatchError` saying what was expected.
        """
        block = self.own_block(kv) if type(kv) is KeysValues else None
        if block is not None:  # one pass, no generator: this runs on every set
            top = self.max_tokens
            found: List[int] = []
            for layer in kv._keys_values:
                k, v = layer._k_cache._size, layer._v_cache._size
                if type(k) is not int or type(v) is not int or not (0 <= k <= top and 0 <= v <= top):
                    break
                found += (k, v)
            else:
                return block, tuple(found)
        else:
            fitting = self._fitting_foreign(kv)
            if fitting is not None:
                return fitting
        tensors, sizes = entry_tensors(kv)
        if len(tensors) != 2 * self.num_layers:
            raise EntryMismatchError(f"entry has {len(tensors) // 2} layers, the pool's slots hold {self.num_layers}")
        shape = self.layer_shape
        for i, t in enumerate(tensors):
            if t.shape != shape or t.dtype != self.dtype or t.device != self.device:
                raise EntryMismatchError(
                    f"entry tensor {i} is {tuple(t.shape)} {t.dtype} on {t.device}; "
                    f"the pool's slots hold {shape} {self.dtype} on {self.device}"
                )
        for s in sizes:
            if not 0 <= s <= self.max_tokens:
                raise EntryMismatchError(f"entry _size {s} is outside [0, {self.max_tokens}]")
        return [t.detach() if t.requires_grad else t for t in tensors], tuple(int(x) for x in sizes)

    def _fitting_foreign(self, kv: Any) -> Optional[Tuple[List[torch.Tensor], Tuple[int, ...]]]:
        """The hot path of an entry in LightZero's own layout (a tensor per cache): its tensors
        and sizes in one pass when everything fits, else None (the full check then says why)."""
        shape, dtype, top, on_cpu = self._layer_size, self.dtype, self.max_tokens, self._on_cpu
        tensors: List[torch.Tensor] = []
        sizes: List[int] = []
        try:
            for layer in kv._keys_values:
                k, v = layer._k_cache, layer._v_cache
                kt, vt, ks, vs = k._cache, v._cache, k._size, v._size
                if type(kt) is not torch.Tensor or type(vt) is not torch.Tensor or type(ks) is not int \
                        or type(vs) is not int or not (0 <= ks <= top and 0 <= vs <= top) \
                        or kt.shape != shape or vt.shape != shape or kt.dtype is not dtype or vt.dtype is not dtype \
                        or kt.requires_grad or vt.requires_grad \
                        or not (kt.is_cpu and vt.is_cpu if on_cpu else self.holds_device(kt) and self.holds_device(vt)):
                    return None
                tensors += (kt, vt)
                sizes += (ks, vs)
        except (AttributeError, TypeError):
            return None
        return (tensors, tuple(sizes)) if len(tensors) == 2 * self.num_layers else None

    def holds_device(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is on this spec's device (is_cpu is a flag; building t.device costs more
        than every other check of a tensor together)."""
        return t.is_cpu if self._on_cpu else t.device == self.device
