"""The batched cache seam of LightZero 0.2.0's UniZero world model (modes "new" and "switch_over").

LightZero's own cache work runs per environment and per layer: ~350 small tensor operations per
Atari recurrent call (see docs/benchmarks.md). Here the same work is done for the whole batch
in a handful of operations, with the model's outputs bit for bit the same:

* **lookups** pin the entries (no copy): the root lookups through the maps LightZero's
  ``wm_forward_for_initial_infererence`` calls per env, the recurrent ones in
  :meth:`BatchedSeam.retrieve_or_generate_kvcache` (each env's own root pool, then one
  :meth:`~concurrent_kv.pool.KVCachePool.lookup_many` over the recur pool);
* **the batched keys_values_wm** (:meth:`BatchedSeam.trim_and_pad_kv_cache`): every pinned
  entry copied into its env's row, right-aligned behind zeros, as LightZero's
  ``F.pad``/``torch.stack`` lay it out: one ``_foreach_copy_`` and one ``_foreach_zero_``;
* **stores** (:meth:`BatchedSeam.update_cache_context`): every env's entry cut out of the batch
  into a slot reserved for it: one ``_foreach_copy_``; past the context window, LightZero drops
  the first two tokens and adds its precomputed positional correction
  ``pos_emb_new - pos_emb_old`` to the rest, which is one ``_foreach_add_`` here, the same
  float32 additions.

Every copy moves an entry's valid tokens only: the model never reads past an entry's size
(every read is ``cache[:, :, :size]``), so the tokens there, zeros in LightZero's entries, are
left as they were. The left padding it does read is zeroed. Each window of the batch and each
slot's token prefix is a view made once and kept, so a call creates no views.

Misses (an entry refused when every slot was held, or evicted) recompute as LightZero does; the
reanalyze phase keeps LightZero's own per-env lookup code (it never reads the cache). Lookups
pin their slots until the batched copy, and stores are reserved, written without a lock and
published under one, so other collectors on a shared manager are never blocked by the copies.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch
import xxhash

from ..batch import PinnedBatch, SizesLike, WriteBatch
from ..collector import CollectorCaches
from ..entry import EntrySpec, entry_tensors
from ..keys import hash_state
from .lightzero import IntegrationError, _key, _PoolMap, _Route, _Staging

__all__ = ["BatchedSeam", "BATCHED_SEAMS", "supports"]

#: The world model's methods replaced on the instance (LightZero 0.2.0's names).
BATCHED_SEAMS = ("trim_and_pad_kv_cache", "update_cache_context", "retrieve_or_generate_kvcache")
_NEEDS = BATCHED_SEAMS + ("transformer", "context_length", "num_layers", "forward", "reanalyze_phase")
#: Scratch blocks kept per batch size (reanalysis batches vary; collect and eval use one or two).
_SCRATCH_KEPT = 4
#: Window lists kept per scratch block (one per combination of the envs' cuts seen).
_CUTS_KEPT = 1024


def supports(world_model: Any) -> bool:
    """Whether ``world_model`` has LightZero 0.2.0's batched seam (a UniZero ``WorldModel``)."""
    return all(hasattr(world_model, name) for name in _NEEDS)


def _set(world_model: Any, **values: Any) -> None:
    """Set plain attributes of the world model (an ``nn.Module``) without its ``__setattr__``,
    which checks for parameters, buffers and submodules at several microseconds a call."""
    world_model.__dict__.update(values)


_NO_CONTEXT = contextlib.nullcontext()


def _no_grad() -> ContextManager[Any]:
    """``torch.no_grad()`` only where grad mode is on: LightZero's inference already runs without
    it, and entering it costs a call into torch per use."""
    return torch.no_grad() if torch.is_grad_enabled() else _NO_CONTEXT


def _key_function(world_model: Any) -> Callable[[np.ndarray], int]:
    """LightZero's key of a numpy latent as an int: its module's ``hash_state`` (0.2.0: the xxh64
    hex digest, later the int) read by ``_key``; xxh64's int digest itself when that is what it
    computes (checked on a probe), which skips a hex string per key."""
    lightzero_hash = getattr(sys.modules.get(type(world_model).__module__), "hash_state", None)
    if lightzero_hash is None:
        return hash_state
    probe = np.arange(7, dtype=np.float32)
    if _key(lightzero_hash(probe)) == xxhash.xxh64_intdigest(probe.tobytes()):
        return cast(Callable[[np.ndarray], int], xxhash.xxh64_intdigest)
    return lambda state: _key(lightzero_hash(state))


class _PinnedEntry:
    """A pinned entry where LightZero holds a slot index, a slot's entry or a staged copy: the
    batched copy reads it; ``size`` is what LightZero reads (layer 0's K token count)."""

    __slots__ = ("batch", "index", "size")

    def __init__(self, batch: PinnedBatch, index: int, size: int = -1) -> None:
        self.batch, self.index = batch, index
        self.size = batch.size(index) if size < 0 else size  # a batch's sizes come in one call

    def view(self, tokens: int) -> torch.Tensor:
        return self.batch.view(self.index, tokens)


class _Pins:
    """The batches pinned since the last batched copy: released by it, by a clear, or (after an
    exception in between) at the next call, so a pin lives at most one call."""

    def __init__(self) -> None:
        self._batches: List[PinnedBatch] = []

    def add(self, batch: PinnedBatch) -> PinnedBatch:
        if batch.hits:  # a batch that missed everywhere pins nothing
            self._batches.append(batch)
        return batch

    def release_all(self) -> None:
        if self._batches:
            batches, self._batches = self._batches, []
            for batch in batches:
                batch.release()


class _PinMap(_PoolMap):
    """A key -> slot map whose ``get`` pins the entry and returns a :class:`_PinnedEntry` (copied
    once, with the rest of the batch, by the batched copy)."""

    def __init__(self, route: _Route, staging: _Staging, pins: _Pins) -> None:
        super().__init__(route, staging)
        self._pins = pins

    def get(self, key: Any, default: Any = None) -> Any:
        c, env = self._route.collector, self._route.env_id
        k = _key(key)
        batch = self._pins.add(c.pin_recur_many([k]) if env is None else c.pin_init(env, k))
        return _PinnedEntry(batch, 0) if batch.slots[0] >= 0 else default

    def clear(self) -> None:
        self._pins.release_all()  # a cleared entry's slot is reused as soon as it is unpinned
        super().clear()


class _PinSlots:
    """Stands where a slot list was: indexing with a token gives the token (None for a miss,
    which makes LightZero recompute)."""

    def __getitem__(self, token: Any) -> Any:
        return token

    def __len__(self) -> int:
        return 0


def _runs(values: Sequence[int], envs: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``envs`` (ascending) as runs ``(first, stop, value)`` of neighbours with the same value,
    so that one view covers a run: one when every env has the same value (the usual case)."""
    out: List[Tuple[int, int, int]] = []
    for env in envs:
        if out and out[-1][1] == env and out[-1][2] == values[env]:
            out[-1] = (out[-1][0], env + 1, values[env])
        else:
            out.append((env, env + 1, values[env]))
    return out


class _Scratch:
    """The batched keys_values_wm of ``B`` envs: one block ``(2L, B, heads, T, head_dim)``, whose
    layers are the model's caches (laid out as LightZero's ``torch.stack`` lays them out), and
    the views the batched copies use, each made once."""

    def __init__(self, world_model: Any, spec: EntrySpec, batch: int) -> None:
        self.tokens = spec.max_tokens
        self.block = torch.zeros((2 * spec.num_layers, batch, *spec.layer_shape[1:]), dtype=spec.dtype,
                                 device=spec.device)
        self.layers = list(self.block.unbind(0))  # (B, heads, T, hd) each
        self.kv = world_model.transformer.generate_empty_keys_values(n=batch, max_tokens=self.tokens)  # LightZero's
        self._caches = [c for layer in self.kv._keys_values for c in (layer._k_cache, layer._v_cache)]
        self._views: Dict[Tuple[int, int, int, int], torch.Tensor] = {}
        self._cuts: Dict[Tuple[int, ...], List[torch.Tensor]] = {}

    def window(self, env: int, start: int, length: int, stop_env: int = -1) -> torch.Tensor:
        """Tokens ``[start, start + length)`` of envs ``env .. stop_env - 1`` (default: ``env``
        alone), every cache: ``(2L, envs, heads, length, hd)``."""
        stop_env = env + 1 if stop_env < 0 else stop_env
        key = (env, stop_env, start, length)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.block[:, env:stop_env, :, start : start + length]
        return view

    def windows(self, starts: Sequence[int], lengths: Sequence[int]) -> List[torch.Tensor]:
        """Every env's window, env ``i``'s tokens ``[starts[i], starts[i] + lengths[i])``: one
        list per cut, made once (a search repeats a handful of cuts). Read it, never change it."""
        key = (*starts, *lengths)
        views = self._cuts.get(key)
        if views is None:
            if len(self._cuts) >= _CUTS_KEPT:
                self._cuts.clear()
            views = self._cuts[key] = [self.window(env, start, length)
                                       for env, (start, length) in enumerate(zip(starts, lengths))]
        return views

    def bind(self, size: int) -> Any:
        """The model's keys_values_wm over the block, ``size`` tokens valid."""
        for cache, layer in zip(self._caches, self.layers):
            cache._cache, cache._size = layer, size
        return self.kv

    def holds(self, kv: Any) -> bool:
        """Whether ``kv`` is this block's keys_values_wm, still over the block: the model's cache
        update hands back a new tensor over the same memory, and only LightZero's own
        trim_and_pad_kv_cache (replaced here) reassigns the caches, all of them, so the first and
        the last cache tell."""
        if kv is not self.kv:
            return False
        first, last = kv._keys_values[0]._k_cache._cache, kv._keys_values[-1]._v_cache._cache
        return first.data_ptr() == self.layers[0].data_ptr() and last.data_ptr() == self.layers[-1].data_ptr()


class BatchedSeam:
    """The batched seam of one world model, through one collector's view of a manager."""

    def __init__(self, world_model: Any, collector: CollectorCaches) -> None:
        self.wm, self.collector = world_model, collector
        self.pins = _Pins()
        probe = world_model.transformer.generate_empty_keys_values(n=1, max_tokens=world_model.context_length)
        spec = EntrySpec.of(probe)  # LightZero's own entry: (1, heads, context, hd), default dtype
        # The recur pool's own spec object when they agree, so its per-store comparison is an identity.
        self.spec = spec if collector.recur_pool.entry_spec != spec else collector.recur_pool.entry_spec
        self._digest = _key_function(world_model)
        self._scratch: Dict[int, _Scratch] = {}
        self._diff: Tuple[List[torch.Tensor], Optional[torch.Tensor]] = ([], None)

    def install(self, staging: _Staging) -> None:
        """Replace the world model's cache seams on the instance (the adapter restores them)."""
        wm, c, pins = self.wm, self.collector, self.pins
        wm.past_kv_cache_init_infer_envs = [_PinMap(_Route(c, e), staging, pins) for e in range(c.env_num)]
        wm.past_kv_cache_recurrent_infer = _PinMap(_Route(c, None), staging, pins)
        wm.shared_pool_init_infer = [_PinSlots() for _ in range(c.env_num)]
        wm.shared_pool_recur_infer = _PinSlots()
        wm.shared_pool_wm = _PinSlots()
        wm.custom_copy_kv_cache_to_shared_wm = lambda kv: kv  # the batched copy makes the private copy
        wm.trim_and_pad_kv_cache = self.trim_and_pad_kv_cache
        wm.update_cache_context = self.update_cache_context
        wm.retrieve_or_generate_kvcache = self.retrieve_or_generate_kvcache

    def scratch(self, batch: int) -> _Scratch:
        """The scratch block of ``batch`` envs (a few sizes kept: reanalysis batches vary)."""
        sc = self._scratch.get(batch)
        if sc is None:
            if len(self._scratch) >= _SCRATCH_KEPT:
                self._scratch.clear()
            sc = self._scratch[batch] = _Scratch(self.wm, self.spec, batch)
        return sc

    # -- lookups ---------------------------------------------------------------------------

    def retrieve_or_generate_kvcache(self, latent_state: Sequence[Any], ready_env_num: int,
                                     simulation_index: int = 0, start_pos: Any = 0) -> List[int]:
        """LightZero's recurrent lookup: each env's root pool, then the recur pool (one lock for
        the batch); hits are pinned, misses recomputed one env at a time as LightZero does."""
        wm = self.wm
        if wm.reanalyze_phase:  # never reads the cache: LightZero's own per-env code
            return type(wm).retrieve_or_generate_kvcache(wm, latent_state, ready_env_num, simulation_index, start_pos)
        self.pins.release_all()
        digest = self._digest
        keys = [digest(latent_state[i]) for i in range(ready_env_num)]
        found: List[Optional[_PinnedEntry]] = [
            _PinnedEntry(self.pins.add(batch), 0) if batch.hits else None for batch in self.collector.pin_roots(keys)]
        rest = [i for i, token in enumerate(found) if token is None]
        if rest:
            recur = self.pins.add(self.collector.pin_recur_many([keys[i] for i in rest]))
            for j, size in enumerate(recur.first_sizes()):
                if size >= 0:
                    found[rest[j]] = _PinnedEntry(recur, j, size)
        entries, sizes = wm.keys_values_wm_list, wm.keys_values_wm_size_list
        for env, token in enumerate(found):
            if token is not None:
                entries.append(token)
                sizes.append(token.size)
            else:
                self._recompute(latent_state[env], int(start_pos[env].item()))
        hits = len(found) - found.count(None)
        _set(wm, total_query_count=wm.total_query_count + len(found), hit_count=wm.hit_count + hits)
        return sizes

    def _recompute(self, state: Any, start_pos: int) -> None:
        """A miss, as LightZero 0.2.0 handles it: the env's latent alone through the model."""
        wm = self.wm
        wm.keys_values_wm_single_env = wm.transformer.generate_empty_keys_values(n=1, max_tokens=wm.context_length)
        wm.forward({"obs_embeddings": torch.from_numpy(state).unsqueeze(0).to(wm.device)},
                   past_keys_values=wm.keys_values_wm_single_env, is_init_infer=True, start_pos=start_pos)
        wm.keys_values_wm_list.append(wm.keys_values_wm_single_env)
        wm.keys_values_wm_size_list.append(1)

    # -- the batched keys_values_wm -----------------------------------------------------------

    def trim_and_pad_kv_cache(self, is_init_infer: bool = True) -> List[int]:
        """Build keys_values_wm from keys_values_wm_list: each env's entry right-aligned to the
        longest, zeros before it (LightZero's layout), in two tensor operations."""
        wm = self.wm
        entries, sizes = wm.keys_values_wm_list, wm.keys_values_wm_size_list
        longest, sc = max(sizes), self.scratch(len(entries))
        pads = [longest - size for size in sizes]
        dst, src = self._row_pairs(sc, entries, sizes, pads)
        padded = _runs(pads, [env for env, pad in enumerate(pads) if pad])
        with _no_grad():
            torch._foreach_copy_(dst, src)
            if padded:  # the left padding the model attends to: exact zeros
                torch._foreach_zero_([sc.window(first, 0, pad, stop) for first, stop, pad in padded])
        self.pins.release_all()
        _set(wm, keys_values_wm=sc.bind(longest))
        return sizes

    def _row_pairs(self, sc: _Scratch, entries: List[Any], sizes: List[int],
                    pads: List[int]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(row window, entry) pairs that build keys_values_wm: every entry's valid tokens, right-
        aligned behind its padding. When every entry is pinned (the usual case) the windows are
        the cut's cached list."""
        src: List[torch.Tensor] = []
        for entry, size in zip(entries, sizes):
            if type(entry) is not _PinnedEntry:
                break
            src.append(entry.view(size))
        else:
            return sc.windows(pads, sizes), src
        dst: List[torch.Tensor] = []
        src = []
        for env, entry in enumerate(entries):
            window = sc.window(env, pads[env], sizes[env])
            if type(entry) is _PinnedEntry:
                dst.append(window)
                src.append(entry.view(sizes[env]))
            else:  # a recomputed miss: LightZero's own entry, checked as a pool checks a stored one
                data, _ = self.spec.check(entry)
                for cache, tensor in enumerate(data):  # one tensor per cache (a block's rows alike)
                    dst.append(window[cache])
                    src.append(tensor[:, :, : sizes[env]])
        return dst, src

    # -- stores ----------------------------------------------------------------------------

    def update_cache_context(self, latent_state: torch.Tensor, is_init_infer: bool = True,
                             simulation_index: int = 0, search_depth: Any = (),
                             valid_context_lengths: Any = None) -> None:
        """Store every env's entry, cut out of keys_values_wm as LightZero 0.2.0 cuts it: roots
        in their env's root pool, search nodes (held) in the recur pool."""
        wm = self.wm
        if wm.context_length <= 2:  # LightZero keeps no context then
            return
        self.pins.release_all()
        envs = latent_state.size(0)
        sc = self.scratch(envs)
        if not sc.holds(wm.keys_values_wm):
            self._adopt(sc, wm.keys_values_wm)
        starts, sizes, rolled = self._cuts(envs, is_init_infer)
        keys = self._keys(latent_state)
        # Each entry's valid tokens, where they are cut from (past an entry's size nothing is read).
        # One count for every cache (the usual case): _cuts gives every env the same kind of size.
        uniform = not sizes or type(sizes[0]) is int
        lengths = cast(List[int], sizes) if uniform else [size if isinstance(size, int) else max(size) for size in sizes]
        with _no_grad():
            if rolled and not wm.config.rotary_emb:  # LightZero's positional correction, in place
                shifted = [sc.window(first, start, sc.tokens - 3, stop) for first, stop, start in _runs(starts, rolled)]
                torch._foreach_add_(shifted, [self._pos_emb_diff()] * len(shifted))
            windows = sc.windows(starts, lengths)
            if is_init_infer:
                self._store_roots(keys, windows, sizes)
            else:  # one batch, one lock hold, one copy, of views of the scratch block: nothing to check
                width = 2 * self.spec.num_layers
                rows = [(size,) * width if uniform or isinstance(size, int) else tuple(size) for size in sizes]
                self.collector._store_recur_views(keys, windows, rows, self.spec)

    def _cuts(self, envs: int, is_init_infer: bool) -> Tuple[List[int], List[SizesLike], List[int]]:
        """Where each env's entry starts in its row, its token counts, and which envs roll their
        window (LightZero keeps the last ``context_length - 3`` tokens once ``context_length - 1``
        are reached)."""
        wm, t = self.wm, self.wm.context_length
        if is_init_infer:  # roots: the whole row, padding included, as LightZero stores it
            _, counts = entry_tensors(wm.keys_values_wm)
            if counts[0] < t - 1:
                return [0] * envs, [counts[0] if len(set(counts)) == 1 else counts] * envs, []
            return [2] * envs, [t - 3] * envs, list(range(envs))
        current = wm.keys_values_wm_size_list_current
        longest = max(current)
        starts: List[int] = []
        sizes: List[SizesLike] = []
        rolled: List[int] = []
        for env, size in enumerate(current):
            pad = longest - size  # LightZero trims the padding off the front
            if size >= t - 1:
                starts.append(pad + 2)
                sizes.append(t - 3)
                rolled.append(env)
            else:
                starts.append(pad)
                sizes.append(size)
        return starts, sizes, rolled

    def _keys(self, latent_state: torch.Tensor) -> List[int]:
        """Each env's key, from one host copy of the batch (LightZero hashes env by env)."""
        flat = latent_state.detach() if latent_state.requires_grad else latent_state
        rows = (flat.cpu() if flat.is_cuda else flat).numpy()  # one host copy on a GPU
        digest = self._digest
        return [digest(row) for row in rows.reshape(rows.shape[0], -1)]

    def _store_roots(self, keys: List[int], windows: List[torch.Tensor], sizes: List[SizesLike]) -> None:
        """Each env's root entry into its own root pool: a slot reserved in every pool, one copy
        for them all, then a commit per pool."""
        c, spec = self.collector, self.spec
        batches: List[WriteBatch] = []
        try:
            for env, (key, size) in enumerate(zip(keys, sizes)):
                batches.append(c.write_init(env, key, size, spec))
            targets: List[torch.Tensor] = []
            sources: List[torch.Tensor] = []
            for batch, window in zip(batches, windows):
                target = batch.view(0, window.shape[3])
                if target is not None:  # not refused
                    targets.append(target)
                    sources.append(window)
            if targets:
                torch._foreach_copy_(targets, sources)
        except BaseException:
            for batch in batches:
                batch.abort()
            raise
        for batch in batches:
            c.commit(batch)

    def _adopt(self, sc: _Scratch, kv: Any) -> None:
        """Copy a keys_values_wm LightZero built itself (an episode's first step) into the block."""
        tensors, _ = entry_tensors(kv)
        want = (len(sc.layers), *sc.layers[0].shape)
        if len(tensors) != want[0] or any(t.shape != sc.layers[0].shape for t in tensors):
            raise IntegrationError(f"keys_values_wm is not a batch of LightZero's entries: {len(tensors)} x "
                                   f"{tuple(tensors[0].shape)}, expected {want}")
        with _no_grad():
            torch._foreach_copy_(sc.layers, tensors)

    def _pos_emb_diff(self) -> torch.Tensor:
        """LightZero's precomputed positional correction of every cache, ``(2L, 1, heads, T-3, hd)``,
        restacked only when ``precompute_pos_emb_diff_kv`` made new ones (after training)."""
        wm = self.wm
        source, stacked = self._diff
        if stacked is None or source[0] is not wm.pos_emb_diff_k or source[1] is not wm.pos_emb_diff_v:
            window = (2, wm.context_length - 1)
            stacked = torch.stack([d[window] for layer in range(self.spec.num_layers)
                                   for d in (wm.pos_emb_diff_k[layer], wm.pos_emb_diff_v[layer])])
            self._diff = ([wm.pos_emb_diff_k, wm.pos_emb_diff_v], stacked)
        return stacked
