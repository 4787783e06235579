"""Fixed-length arrays of numbers indexed from Python: the storage unit of all pool metadata.

A pool's bookkeeping (slot states, keys, pins, the eviction policy's links) lives in such arrays:
plain lists in process memory (they index fastest from Python), or ``memoryview`` casts over a
shared-memory segment, so one piece of code serves both.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Protocol, Sequence, Tuple, Union, overload

__all__ = ["Cells", "ArrayFactory", "list_arrays", "CountingArrays"]


class Cells(Protocol):
    """What the metadata code asks of an array: a list, or a ``memoryview`` over shared memory."""

    @overload
    def __getitem__(self, index: int, /) -> Any: ...

    @overload
    def __getitem__(self, index: slice, /) -> Sequence[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __setitem__(self, index: int, value: Any, /) -> None: ...

    def __len__(self) -> int: ...


#: ``factory(length, fill, kind)`` returns a mutable int ("i") or float ("f") array.
ArrayFactory = Callable[[int, Union[int, float], str], Cells]


def list_arrays(length: int, fill: Union[int, float], kind: str) -> Cells:
    """The in-process array factory: plain lists index fastest from Python."""
    out: List[Union[int, float]] = [fill] * length
    return out


class CountingArrays:
    """An array factory that records what it hands out, so a shared layout can reserve exactly
    the cells a policy allocates (its arrays are requested in a fixed order)."""

    def __init__(self) -> None:
        self.requests: List[Tuple[int, str]] = []

    def __call__(self, length: int, fill: Union[int, float], kind: str) -> Cells:
        self.requests.append((length, kind))
        return list_arrays(length, fill, kind)

    @property
    def cells(self) -> int:
        return sum(length for length, _ in self.requests)
