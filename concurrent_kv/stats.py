"""Cache statistics: live counters and immutable snapshots.

A pool owns one :class:`CacheStats` and updates it under its bookkeeping lock, so no increment
is lost under threads. :meth:`CacheStats.snapshot` freezes the counters into a
:class:`StatsSnapshot`, whose difference gives per-interval deltas (Caffeine's ``minus``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, MutableSequence

__all__ = [
    "CacheStats", "StatsSnapshot", "COUNTERS", "HITS", "MISSES", "EVICTIONS", "INSERTS", "UPDATES",
]

#: The counters, in their order in ``CacheStats.counters`` and in a shared pool's stats rows.
COUNTERS = ("hits", "misses", "evictions", "inserts", "updates")
#: Positions of the counters in ``CacheStats.counters`` (and in a shared pool's stats rows).
HITS, MISSES, EVICTIONS, INSERTS, UPDATES = range(len(COUNTERS))


def _rate(part: int, total: int) -> float:
    return part / total if total else 0.0


class _Rates:
    """Derived figures, shared by the live counters and their snapshots."""

    hits: int
    misses: int

    @property
    def total_queries(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return _rate(self.hits, self.total_queries)

    @property
    def miss_rate(self) -> float:
        return _rate(self.misses, self.total_queries)


@dataclass(frozen=True)
class StatsSnapshot(_Rates):
    """Counters of one pool at one instant; ``later - earlier`` gives the interval's deltas."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    inserts: int = 0
    updates: int = 0

    def __sub__(self, other: "StatsSnapshot") -> "StatsSnapshot":
        if not isinstance(other, StatsSnapshot):
            return NotImplemented
        return StatsSnapshot(*(getattr(self, f) - getattr(other, f) for f in COUNTERS))

    def __add__(self, other: "StatsSnapshot") -> "StatsSnapshot":
        if not isinstance(other, StatsSnapshot):
            return NotImplemented
        return StatsSnapshot(*(getattr(self, f) + getattr(other, f) for f in COUNTERS))

    def as_dict(self) -> Dict[str, float]:
        """A flat dict of counters and rates, ready for a tensorboard-style logger."""
        out: Dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total_queries"] = self.total_queries
        out["hit_rate"] = self.hit_rate
        out["miss_rate"] = self.miss_rate
        return out

    def __str__(self) -> str:
        return (
            f"CacheStats(hits={self.hits}, misses={self.misses}, evictions={self.evictions}, "
            f"total_queries={self.total_queries}, hit_rate={self.hit_rate:.2%}, "
            f"inserts={self.inserts}, updates={self.updates})"
        )


class CacheStats(_Rates):
    """Live hit/miss/eviction counters of one pool.

    ``total_queries`` is derived (hits + misses) so the two can never disagree. The counters live
    in one small list, ``counters``, indexed by ``HITS`` ... ``UPDATES``: the pool increments it
    directly under its bookkeeping lock, and a shared pool swaps in a row of shared memory.
    """

    __slots__ = ("counters",)

    def __init__(self, hits: int = 0, misses: int = 0, evictions: int = 0, inserts: int = 0, updates: int = 0):
        self.counters: MutableSequence[int] = [hits, misses, evictions, inserts, updates]

    hits = property(lambda self: self.counters[HITS], lambda self, v: self.counters.__setitem__(HITS, v))
    misses = property(lambda self: self.counters[MISSES], lambda self, v: self.counters.__setitem__(MISSES, v))
    evictions = property(
        lambda self: self.counters[EVICTIONS], lambda self, v: self.counters.__setitem__(EVICTIONS, v)
    )
    inserts = property(lambda self: self.counters[INSERTS], lambda self, v: self.counters.__setitem__(INSERTS, v))
    updates = property(lambda self: self.counters[UPDATES], lambda self, v: self.counters.__setitem__(UPDATES, v))

    def reset(self) -> None:
        """Set every counter back to zero."""
        for i in range(len(COUNTERS)):
            self.counters[i] = 0

    def snapshot(self) -> StatsSnapshot:
        """An immutable copy of the counters."""
        return StatsSnapshot(*self.counters)

    def as_dict(self) -> Dict[str, float]:
        """See :meth:`StatsSnapshot.as_dict`."""
        return self.snapshot().as_dict()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (CacheStats, StatsSnapshot)):
            return all(getattr(self, f) == getattr(other, f) for f in COUNTERS)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return str(self.snapshot())
