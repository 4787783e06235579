"""concurrent_kv/entry.py: KeysValues (LightZero's attribute surface and semantics), Cache, EntrySpec."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from concurrent_kv import Cache, EntryMismatchError, EntrySpec, InvalidEntryError, KeysValues, KVCachePool
from concurrent_kv.entry import entry_tensors

from .validation_helpers import assert_raises, entry


def make(layers: int = 2, heads: int = 2, tokens: int = 6, embed: int = 8) -> KeysValues:
    return KeysValues(1, heads, tokens, embed, layers, "cpu")


def test_attribute_surface_matches_lightzero() -> None:
    kv = make()
    assert len(kv) == 2
    layer = kv[0]
    assert layer is kv._keys_values[0]
    cache = layer._k_cache
    assert cache._cache.shape == (1, 2, 6, 4)
    assert cache._size == 0 and cache._max_tokens == 6 and cache._device == torch.device("cpu")
    assert kv.size == 0 and layer.shape == (1, 2, 0, 4)
    # _cache and _size are writable, including non-contiguous replacements.
    cache._cache = torch.randn(1, 6, 2, 4).transpose(1, 2)
    cache._size = 3
    assert kv.size == 3 and kv.block_if_intact() is None


def test_caches_are_views_of_one_block() -> None:
    kv = make()
    kv[1]._v_cache._cache.fill_(7.0)
    assert kv._block[3].eq(7.0).all() and kv._block[:3].eq(0).all()
    assert kv.block_if_intact() is kv._block


def test_update_appends_and_drops_an_even_number_on_overflow() -> None:
    kv = make(layers=1, tokens=6)
    for step in range(3):
        k = torch.full((1, 2, 2, 4), float(step))
        kv[0].update(k, k.clone())
    assert kv.size == 6
    assert [kv[0]._k_cache._cache[0, 0, t, 0].item() for t in range(6)] == [0, 0, 1, 1, 2, 2]
    # One more token overflows by 1, so 2 (an even number) of the oldest are dropped.
    k = torch.full((1, 2, 1, 4), 3.0)
    kv[0].update(k, k.clone())
    assert kv.size == 5
    assert [kv[0]._k_cache.get()[0, 0, t, 0].item() for t in range(5)] == [1, 1, 2, 2, 3]
    # A shift at least as large as the contents resets the cache instead.
    big = torch.full((1, 2, 6, 4), 9.0)
    kv[0].update(big, big.clone())
    assert kv.size == 6 and kv[0]._k_cache.get().eq(9.0).all()


def test_update_keeps_autograd_working() -> None:
    kv = make(layers=1)
    x = torch.randn(1, 2, 2, 4, requires_grad=True)
    kv[0].update(x, x * 2)
    kv[0]._k_cache.get().sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_clone_is_deep_and_keeps_dtype_and_sizes() -> None:
    kv = KeysValues(1, 2, 4, 8, 2, "cpu", dtype=torch.float64)
    kv[0]._k_cache._cache.normal_()
    kv[1]._v_cache._size = 3
    twin = kv.clone()
    assert twin._block.dtype == torch.float64
    assert torch.equal(twin._block, kv._block) and twin._block.data_ptr() != kv._block.data_ptr()
    assert [c._size for c in twin._caches()] == [c._size for c in kv._caches()]
    kv[0]._k_cache._cache.zero_()
    assert not torch.equal(twin._block, kv._block)


def test_clone_of_a_replaced_cache_stacks_the_tensors() -> None:
    kv = make()
    kv[0]._k_cache._cache = torch.ones(1, 2, 6, 4)
    twin = kv.clone()
    assert twin.block_if_intact() is not None and twin[0]._k_cache._cache.eq(1).all()


def test_reset_prune_and_register_tokens() -> None:
    kv = KeysValues(3, 2, 4, 8, 1, "cpu")
    for c in kv._caches():
        c._size = 4
    kv.remove_register_tokens(1)
    assert [c._size for c in kv._caches()] == [3, 3]
    kv.remove_register_tokens(0)
    assert kv.size == 3
    kv.prune(np.array([True, False, True]))
    assert kv[0]._k_cache._cache.shape[0] == 2 and kv[0]._k_cache._num_samples == 2
    with pytest.raises(EntryMismatchError):
        kv.prune(np.array([True]))
    kv.reset()
    assert kv.size == 0


def test_entry_tensors_refuses_foreign_objects() -> None:
    for bad in (object(), 3, {"_keys_values": 1}):
        with pytest.raises(InvalidEntryError):
            entry_tensors(bad)


def test_spec_of_and_nbytes() -> None:
    kv = KeysValues(1, 8, 8, 768, 2, "cpu")
    spec = EntrySpec.of(kv)
    assert spec == EntrySpec(2, 1, 8, 8, 96)
    assert spec.nbytes == 96 * 1024  # LightZero's Atari entry
    assert spec.block_shape == (4, 1, 8, 8, 96)
    assert "KeysValues(layers=2" in repr(kv)


def test_pool_stores_a_source_that_requires_grad_without_tracking_it() -> None:
    kv = make()
    src = torch.randn(1, 2, 6, 4, requires_grad=True)
    kv[0]._k_cache._cache = src * 1.0  # a non-leaf tensor in a graph
    pool = KVCachePool(2)
    pool.set(1, kv)
    got = pool.get(1)
    assert not got._block.requires_grad
    assert torch.equal(got[0]._k_cache._cache, src.detach())


def test_get_into_a_foreign_entry_copies_data_and_sizes() -> None:
    pool = KVCachePool(2)
    kv = make()
    kv._block.normal_()
    for i, c in enumerate(kv._caches()):
        c._size = i + 1
    pool.set(5, kv)
    out = make()
    out[0]._k_cache._cache = torch.zeros(1, 2, 6, 4)  # no longer a block view: the slow path
    assert pool.get(5, out=out) is out
    assert torch.equal(out[0]._k_cache._cache, kv[0]._k_cache._cache)
    assert torch.equal(out[1]._v_cache._cache, kv[1]._v_cache._cache)
    assert [c._size for c in out._caches()] == [1, 2, 3, 4]


def lightzero_layout(value: float = 1.0, size: int = 3) -> Any:
    """An entry in LightZero's own layout (a tensor per cache) of the spec below."""
    from .helpers import LZKeysValues, caches

    kv = LZKeysValues(1, 2, 4, 8, 2)
    for i, c in enumerate(caches(kv)):
        c._cache.fill_(value + i)
        c._size = size
    return kv


FOREIGN_SPEC = EntrySpec(2, 1, 2, 4, 4)


def test_a_foreign_entry_is_checked_in_one_pass_with_the_full_checks_answer() -> None:
    kv = lightzero_layout()
    fast = FOREIGN_SPEC._fitting_foreign(kv)
    assert fast is not None
    tensors, sizes = fast
    assert [t.data_ptr() for t in tensors] == [t.data_ptr() for t in entry_tensors(kv)[0]]  # no copy
    assert sizes == (3, 3, 3, 3) and FOREIGN_SPEC.check(kv) == fast


@pytest.mark.parametrize("change", ["grad", "numpy_size", "strided"])
def test_a_foreign_entry_off_the_fast_path_is_still_taken(change: str) -> None:
    kv = lightzero_layout()
    cache = kv._keys_values[1]._v_cache
    if change == "grad":
        cache._cache = cache._cache.clone().requires_grad_(True)
    elif change == "numpy_size":
        cache._size = np.int64(2)
    else:
        cache._cache = torch.ones(1, 2, 8, 4)[:, :, ::2]  # a strided view of the right shape
    assert FOREIGN_SPEC._fitting_foreign(kv) is None or change == "strided"
    tensors, sizes = FOREIGN_SPEC.check(kv)
    assert not any(t.requires_grad for t in tensors) and all(type(s) is int for s in sizes)
    pool = KVCachePool(2, entry_spec=FOREIGN_SPEC)
    pool.set(1, kv)
    out = lightzero_layout(value=-1.0, size=0)
    assert pool.get(1, out=out) is out
    assert all(torch.equal(a, b.detach()) for a, b in zip(entry_tensors(out)[0], entry_tensors(kv)[0]))
    assert entry_tensors(out)[1] == sizes


@pytest.mark.parametrize("change, error", [
    (lambda c: setattr(c, "_cache", torch.zeros(1, 2, 5, 4)), EntryMismatchError),  # wrong token count
    (lambda c: setattr(c, "_cache", torch.zeros(1, 2, 4, 4, dtype=torch.float64)), EntryMismatchError),
    (lambda c: setattr(c, "_cache", torch.zeros(1, 2, 4, 4, device="meta")), EntryMismatchError),
    (lambda c: setattr(c, "_size", 9), EntryMismatchError),
    (lambda c: setattr(c, "_size", "3"), InvalidEntryError),
    (lambda c: setattr(c, "_cache", [0.0]), InvalidEntryError),
])
def test_a_foreign_entry_that_does_not_fit_gets_the_full_checks_error(change: Any, error: Any) -> None:
    kv = lightzero_layout()
    change(kv._keys_values[1]._k_cache)
    assert FOREIGN_SPEC._fitting_foreign(kv) is None
    with pytest.raises(error):
        FOREIGN_SPEC.check(kv)


# ---------------------------------------------------------------------------------------------
# Validation: EntrySpec and entry constructors
# ---------------------------------------------------------------------------------------------

SPEC_OK = {"num_layers": 2, "num_samples": 1, "num_heads": 2, "max_tokens": 4, "head_dim": 4}



@pytest.mark.parametrize("field", list(SPEC_OK))
@pytest.mark.parametrize("value", [0, -1, True, 2.0, "2", None])
def test_entry_spec_rejects_bad_dimension(field: str, value: Any) -> None:
    """Every EntrySpec dimension must be a positive int: EntryMismatchError (a ValueError)."""
    kwargs = dict(SPEC_OK, **{field: value})
    assert_raises(EntryMismatchError, ValueError, lambda: EntrySpec(**kwargs))



@pytest.mark.parametrize("dtype", ["float32", np.float32, None, float])
def test_entry_spec_rejects_bad_dtype(dtype: Any) -> None:
    assert_raises(EntryMismatchError, ValueError, lambda: EntrySpec(**SPEC_OK, dtype=dtype))



@pytest.mark.parametrize("device", ["not-a-device", None, 3.5])
def test_entry_spec_rejects_bad_device(device: Any) -> None:
    """A device that is not a device raises the library's EntryMismatchError, not torch's own error."""
    assert_raises(EntryMismatchError, ValueError, lambda: EntrySpec(**SPEC_OK, device=device))



def test_entry_spec_valid_and_pool_rejects_entries_of_other_spec() -> None:
    """A pool built with entry_spec is formatted at once and refuses entries of another spec."""
    spec = EntrySpec(**SPEC_OK)
    assert spec.device == torch.device("cpu") and spec.nbytes == 2 * 2 * 1 * 2 * 4 * 4 * 4
    pool = KVCachePool(2, entry_spec=spec)
    assert pool.nbytes == 2 * spec.nbytes
    assert_raises(EntryMismatchError, ValueError, lambda: pool.set(1, entry(1.0, tokens=8)))
    assert len(pool) == 0
    pool.set(1, entry(1.0))
    pool.check()



def test_cache_constructor_rejects_indivisible_embed_dim() -> None:
    """embed_dim must divide by num_heads (KeysValues and Cache): EntryMismatchError."""
    assert_raises(EntryMismatchError, ValueError, lambda: KeysValues(1, 8, 8, 100, 2))
    assert_raises(EntryMismatchError, ValueError, lambda: Cache(1, 3, 8, 8))
