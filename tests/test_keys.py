"""concurrent_kv/keys.py: hash_state (LightZero's key function) and check_key."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from concurrent_kv import InvalidKeyError, KeysValues, hash_state
from concurrent_kv.keys import KEY_MAX, check_key

from .helpers import LZKeysValues, _latent, assert_same_data, data_of, pool_of, real_entry
from .validation_helpers import assert_raises

# ---------------------------------------------------------------------------------------------
# hash_state
# ---------------------------------------------------------------------------------------------


def test_hash_state_equals_lightzero_for_numpy_and_torch() -> None:
    latent = torch.randn(1, 768)
    expected = xxhash.xxh64(latent.view(-1).cpu().numpy().tobytes()).intdigest()
    assert hash_state(latent) == expected
    assert hash_state(latent.numpy()) == expected
    assert hash_state(latent[0]) == expected
    assert isinstance(expected, int) and 0 <= expected <= KEY_MAX
    # Non-contiguous views hash their values, as LightZero's .view(-1).cpu().numpy() would.
    wide = torch.randn(4, 6)
    assert hash_state(wide.t()) == xxhash.xxh64(wide.t().contiguous().numpy().tobytes()).intdigest()
    # Bit-exact: a tiny change gives another key.
    bumped = latent.clone()
    bumped[0, 0] += 1e-6
    assert hash_state(bumped) != expected



def test_hash_state_works_on_tensors_that_require_grad() -> None:
    latent = torch.randn(1, 8, requires_grad=True)
    assert hash_state(latent) == hash_state(latent.detach().numpy())



def test_real_kv_consistent_key_generation() -> None:
    """hash_state is xxh64 of the float32 bytes as an int; torch and numpy inputs agree."""
    latent = _latent(7, dim=768)
    key = hash_state(latent)
    assert type(key) is int and 0 <= key < 2**64
    assert key == xxhash.xxh64(latent.numpy().astype(np.float32).tobytes()).intdigest()
    assert hash_state(latent.numpy()) == key
    assert hash_state(latent.view(-1)) == key  # LightZero's latent[i].view(-1)
    assert hash_state(latent.clone().requires_grad_(True)) == key
    assert hash_state(_latent(7, dim=768)) == key  # deterministic
    assert hash_state(_latent(8, dim=768)) != key
    # A non-contiguous row of a batch hashes like its contiguous copy.
    batch = torch.randn(768, 4, generator=torch.Generator().manual_seed(3)).t()
    row = batch[1]
    assert not row.is_contiguous()
    assert hash_state(row) == hash_state(row.contiguous()) == hash_state(row.numpy())
    assert hash_state(row) == xxhash.xxh64(np.ascontiguousarray(row.numpy()).tobytes()).intdigest()
    # Bit-exact: 0.0 and -0.0 are different keys.
    assert hash_state(torch.zeros(4)) != hash_state(-torch.zeros(4))
    # Keys from hash_state work as pool keys for either entry kind.
    pool = pool_of(2)
    pool.set(key, real_entry(KeysValues, 1))
    assert key in pool and hash_state(latent.numpy()) in pool
    pool.set(hash_state(latent), real_entry(LZKeysValues, 2))  # same key: an update
    assert len(pool) == 1 and pool.stats_snapshot().updates == 1
    assert_same_data(pool.get(key), data_of(real_entry(LZKeysValues, 2)))
    pool.check()



@pytest.mark.parametrize("bad", ["abc", [1.0, 2.0], None, torch.randn(3).double(), np.zeros(3, dtype=np.float64)])
def test_hash_state_refuses_other_inputs(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        hash_state(bad)



@pytest.mark.parametrize(
    "latent",
    [
        pytest.param([0.1, 0.2], id="list"),
        pytest.param((0.1, 0.2), id="tuple"),
        pytest.param(None, id="None"),
        pytest.param("latent", id="str"),
        pytest.param(b"\x00\x00\x80?", id="bytes"),
        pytest.param(1.5, id="float"),
        pytest.param(7, id="int"),
        pytest.param(np.float32(1.0), id="np-scalar"),
        pytest.param(np.zeros(4, np.float64), id="np-float64"),
        pytest.param(np.zeros(4, np.float16), id="np-float16"),
        pytest.param(np.zeros(4, np.int32), id="np-int32"),
        pytest.param(np.zeros(4, bool), id="np-bool"),
        pytest.param(torch.zeros(4, dtype=torch.float64), id="torch-float64"),
        pytest.param(torch.zeros(4, dtype=torch.float16), id="torch-float16"),
        pytest.param(torch.zeros(4, dtype=torch.bfloat16), id="torch-bfloat16"),
        pytest.param(torch.zeros(4, dtype=torch.int64), id="torch-int64"),
    ],
)
def test_hash_state_rejects_wrong_type_or_dtype(latent: Any) -> None:
    """hash_state accepts only float32 torch tensors / numpy arrays: else InvalidKeyError (a TypeError)."""
    assert_raises(InvalidKeyError, TypeError, lambda: hash_state(latent))



# ---------------------------------------------------------------------------------------------
# check_key
# ---------------------------------------------------------------------------------------------


def test_check_key_accepts_python_and_numpy_ints() -> None:
    assert check_key(5) == 5
    assert check_key(np.uint64(KEY_MAX)) == KEY_MAX
    assert type(check_key(np.int64(7))) is int
    for bad in (-1, KEY_MAX + 1, True, np.bool_(True), 1.0, "1", None):
        with pytest.raises(InvalidKeyError):
            check_key(bad)
