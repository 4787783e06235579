"""A short soak in CI (``SOAK_SECONDS``, default 6): kills, clears, verified reads, no leaks."""

from __future__ import annotations

import os

import pytest

from .soak import soak

pytestmark = pytest.mark.stress


def test_soak_with_random_kills_and_clears() -> None:
    summary = soak(float(os.environ.get("SOAK_SECONDS", "6")), processes=2, threads=2, seed=1)
    print(summary)
    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["corrupt"] == 0
    assert summary["kills_survived"] >= 2
    assert summary["verified"] > 0 and summary["errors"] == 0
    assert summary["recovery_s_max"] < 1.0, summary
    assert summary["leaked_segments"] == [] and summary["leaked_fds"] == [] and summary["leaked_processes"] == []
