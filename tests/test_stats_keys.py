"""Statistics snapshots and the LightZero-compatible key function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from concurrent_kv import CacheStats, InvalidKeyError, StatsSnapshot, hash_state
from concurrent_kv.keys import KEY_MAX, check_key


def test_snapshot_is_frozen_and_differences_give_interval_deltas() -> None:
    live = CacheStats(hits=3, misses=1)
    first = live.snapshot()
    live.hits += 5
    live.evictions += 2
    delta = live.snapshot() - first
    assert delta == StatsSnapshot(hits=5, evictions=2)
    assert delta.hit_rate == 1.0 and delta.total_queries == 5
    with pytest.raises(AttributeError):
        first.hits = 0  # type: ignore[misc]
    assert (first + delta) == live.snapshot()
    assert first.__sub__(3) is NotImplemented and first.__add__(3) is NotImplemented


def test_flat_dict_for_loggers() -> None:
    d = CacheStats(hits=1, misses=3, inserts=2).as_dict()
    assert d == {"hits": 1, "misses": 3, "evictions": 0, "inserts": 2, "updates": 0,
                 "total_queries": 4, "hit_rate": 0.25, "miss_rate": 0.75}


def test_repr_is_the_starting_designs_string_form() -> None:
    text = repr(CacheStats(hits=10, misses=2))
    assert text.startswith("CacheStats(hits=10, misses=2, evictions=0, total_queries=12")
    assert CacheStats(hits=1) == CacheStats(hits=1) and CacheStats(hits=1) != CacheStats(hits=2)
    assert CacheStats().__eq__(5) is NotImplemented


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


@pytest.mark.parametrize("bad", ["abc", [1.0, 2.0], None, torch.randn(3).double(), np.zeros(3, dtype=np.float64)])
def test_hash_state_refuses_other_inputs(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        hash_state(bad)


def test_check_key_accepts_python_and_numpy_ints() -> None:
    assert check_key(5) == 5
    assert check_key(np.uint64(KEY_MAX)) == KEY_MAX
    assert type(check_key(np.int64(7))) is int
    for bad in (-1, KEY_MAX + 1, True, np.bool_(True), 1.0, "1", None):
        with pytest.raises(InvalidKeyError):
            check_key(bad)
