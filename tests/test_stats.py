"""concurrent_kv/stats.py: CacheStats counters and rates, StatsSnapshot deltas, dicts and repr."""

from __future__ import annotations

import pytest

from concurrent_kv import CacheStats, StatsSnapshot

from .helpers import assert_entry, entry, pool_of

# ---------------------------------------------------------------------------------------------
# The starting design's CacheStats behaviours (4)
# ---------------------------------------------------------------------------------------------


def test_cache_stats_initial_values() -> None:
    """A fresh CacheStats has every counter at zero and both rates at 0.0."""
    s = CacheStats()
    assert (s.hits, s.misses, s.evictions, s.inserts, s.updates) == (0, 0, 0, 0, 0)
    assert s.total_queries == 0
    assert s.hit_rate == 0.0 and s.miss_rate == 0.0
    assert s == StatsSnapshot()
    assert s.snapshot() == StatsSnapshot(0, 0, 0, 0, 0)



def test_cache_stats_hit_rate_arithmetic() -> None:
    """total_queries = hits + misses; hit_rate and miss_rate are the two fractions."""
    s = CacheStats(hits=3, misses=1, evictions=2)
    assert s.total_queries == 4
    assert s.hit_rate == pytest.approx(0.75)
    assert s.miss_rate == pytest.approx(0.25)
    s.hits += 4  # 7 hits, 1 miss
    assert s.total_queries == 8
    assert s.hit_rate == pytest.approx(7 / 8)
    assert s.hit_rate + s.miss_rate == pytest.approx(1.0)
    d = s.as_dict()
    assert d["hits"] == 7 and d["misses"] == 1 and d["evictions"] == 2 and d["total_queries"] == 8
    assert d["hit_rate"] == pytest.approx(7 / 8)
    # Snapshots subtract into per-interval deltas.
    later = StatsSnapshot(hits=10, misses=2, evictions=3, inserts=4, updates=1)
    assert later - s.snapshot() == StatsSnapshot(3, 1, 1, 4, 1)



def test_cache_stats_zero_queries_gives_zero_rates() -> None:
    """Zero queries gives 0.0 rates, not ZeroDivisionError, even with other counters non-zero."""
    s = CacheStats(evictions=5, inserts=7, updates=2)
    assert s.total_queries == 0
    assert s.hit_rate == 0.0
    assert s.miss_rate == 0.0
    snap = s.snapshot()
    assert snap.hit_rate == 0.0 and snap.miss_rate == 0.0
    assert snap.as_dict()["hit_rate"] == 0.0



def test_cache_stats_reset() -> None:
    """reset() zeroes every counter; a pool's reset_stats() zeroes counters but keeps entries."""
    s = CacheStats(hits=1, misses=2, evictions=3, inserts=4, updates=5)
    s.reset()
    assert s == StatsSnapshot()
    assert s.total_queries == 0 and s.hit_rate == 0.0

    pool = pool_of(2)
    pool.set(1, entry(1))
    assert pool.get(1) is not None and pool.get(9) is None
    assert pool.stats_snapshot() != StatsSnapshot()
    pool.reset_stats()
    assert pool.stats_snapshot() == StatsSnapshot()
    assert_entry(pool.get(1), 1)
    pool.check()



# ---------------------------------------------------------------------------------------------
# Snapshots, dicts for loggers, the string form
# ---------------------------------------------------------------------------------------------


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
