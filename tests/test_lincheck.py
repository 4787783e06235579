"""tests/stress/lincheck.py: the linearizability checker itself, on hand-made histories (fast tier)."""

from __future__ import annotations

from .stress.lincheck import Op, is_linearizable


def test_sequential_history_is_linearizable() -> None:
    h = [Op(0, 0, 1, "set", 1, 10, None), Op(1, 2, 3, "get", 1, None, 10), Op(2, 4, 5, "delete", 1, None, True),
         Op(3, 6, 7, "get", 1, None, None)]
    assert is_linearizable(h)


def test_stale_read_after_a_completed_write_is_caught() -> None:
    h = [Op(0, 0, 1, "set", 1, 10, None), Op(1, 2, 3, "set", 1, 20, None), Op(2, 4, 5, "get", 1, None, 10)]
    assert not is_linearizable(h)


def test_overlapping_ops_may_take_either_order() -> None:
    h = [Op(0, 0, 10, "set", 1, 10, None), Op(1, 1, 9, "get", 1, None, 10), Op(2, 2, 8, "get", 1, None, None)]
    assert is_linearizable(h)  # the None read before the set, the 10 read after it


def test_a_value_never_written_is_caught() -> None:
    assert not is_linearizable([Op(0, 0, 1, "get", 1, None, 99)])


def test_reads_cannot_go_back_in_time() -> None:
    # Two sequential reads see new then old, while a single write of 10 overlaps both.
    h = [Op(0, 0, 100, "set", 1, 10, None), Op(1, 1, 2, "get", 1, None, 10), Op(2, 3, 4, "get", 1, None, None)]
    assert not is_linearizable(h)


def test_delete_result_must_match() -> None:
    assert not is_linearizable([Op(0, 0, 1, "delete", 5, None, True)])
    assert is_linearizable([Op(0, 0, 1, "delete", 5, None, False)])
