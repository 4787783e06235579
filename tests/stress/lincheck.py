"""A Wing-Gong linearizability checker for histories of a key-value map.

A history is a list of :class:`Op` (invoke and return times, operation, key, argument, result)
recorded from several threads or processes. It is linearizable when some order of the ops that
respects real time (an op that returned before another was invoked comes first) replays on a
plain dict with the same results. The search tries every op that may come first, applies it to
the model, and recurses, memoising (remaining ops, model state) pairs it has already refuted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple


@dataclass(frozen=True)
class Op:
    id: int
    invoke: int  # ns
    ret: int  # ns
    kind: str  # "set" | "get" | "delete"
    key: int
    arg: Optional[int]  # the value a set writes
    result: Any  # get: the value read or None; delete: bool; set: None


def _apply(state: Dict[int, int], op: Op) -> Tuple[bool, Dict[int, int]]:
    """Run ``op`` on the sequential spec; return (its result matches, the new state)."""
    if op.kind == "get":
        return state.get(op.key) == op.result, state
    if op.kind == "set":
        new = dict(state)
        new[op.key] = op.arg  # type: ignore[assignment]
        return True, new
    if op.kind == "delete":
        present = op.key in state
        new = dict(state)
        new.pop(op.key, None)
        return present == op.result, new
    raise ValueError(op.kind)


def is_linearizable(history: List[Op]) -> bool:
    ops = sorted(history, key=lambda o: o.invoke)
    refuted: Set[Tuple[FrozenSet[int], FrozenSet[Tuple[int, int]]]] = set()

    def search(remaining: Tuple[Op, ...], state: Dict[int, int]) -> bool:
        if not remaining:
            return True
        memo = (frozenset(o.id for o in remaining), frozenset(state.items()))
        if memo in refuted:
            return False
        earliest_return = min(o.ret for o in remaining)
        for i, op in enumerate(remaining):
            if op.invoke > earliest_return:
                break  # some op returned before this one began: that one must come first
            ok, new_state = _apply(state, op)
            if ok and search(remaining[:i] + remaining[i + 1:], new_state):
                return True
        refuted.add(memo)
        return False

    return search(tuple(ops), {})
