"""concurrent_kv/pool.py on CUDA: slots live on the entries' device (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from concurrent_kv import EntryMismatchError, KeysValues, KVCachePool

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_entries_stay_on_the_gpu() -> None:
    kv = KeysValues(1, 8, 8, 768, 2, "cuda")
    kv._block.normal_()
    pool = KVCachePool(4)
    pool.set(1, kv)
    assert pool._storage is not None and pool._storage.block.is_cuda
    got = pool.get(1)
    assert got._block.is_cuda and torch.equal(got._block, kv._block)
    with pool.lease(1) as view:
        assert view._block.is_cuda and torch.equal(view._block, kv._block)
    with pytest.raises(EntryMismatchError):
        pool.set(2, KeysValues(1, 8, 8, 768, 2, "cpu"))


def test_cpu_pool_refuses_an_entry_on_another_device_type() -> None:
    """Without a GPU, the 'meta' device stands in for 'another device'."""
    pool = KVCachePool(2)
    pool.set(1, KeysValues(1, 2, 4, 8, 1, "cpu"))
    meta = KeysValues(1, 2, 4, 8, 1, "meta")
    with pytest.raises(EntryMismatchError):
        pool.set(2, meta)
    assert list(pool.keys()) == [1]
