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


@cuda
def test_cuda_batches_gather_and_scatter_on_the_device() -> None:
    """lookup_many / write_many / get_many / set_many on CUDA slots: every copy stays on the GPU."""
    from concurrent_kv import EntrySpec

    spec = EntrySpec(2, 1, 8, 8, 96, device="cuda")
    pool = KVCachePool(8, entry_spec=spec)
    entries = [spec.empty_entry() for _ in range(3)]
    for i, kv in enumerate(entries):
        kv._block.fill_(float(i))
    assert pool.set_many([1, 2, 3], entries) == sorted(pool.set_many([1, 2, 3], entries))
    out = torch.zeros(3, *spec.block_shape, device="cuda")
    assert pool.get_many([3, 1, 9], out)[2] is None
    assert out.is_cuda and torch.equal(out[0], entries[2]._block) and torch.equal(out[1], entries[0]._block)
    with pool.lookup_many([2]) as batch:
        assert batch.view(0).is_cuda and batch.view(0, 4).shape[-2] == 4
    with pool.write_many([4], [5]) as write:
        target = write.view(0)
        assert target is not None and target.is_cuda
        target.fill_(7.0)
    assert torch.all(pool.get(4)._block == 7.0)
    with pytest.raises(EntryMismatchError):
        pool.set_many([5], [KeysValues(1, 8, 8, 768, 2, "cpu")])
    pool.check()
