"""The main-branch tier's report: how many outputs each comparison checked bit for bit."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from .head_small import COMPARED

    if not COMPARED:
        return
    terminalreporter.section("outputs compared bit for bit with LightZero main's own KVCacheManager")
    for name, (initial, recurrent, bad) in COMPARED.items():
        terminalreporter.write_line(
            f"{name:<32} {initial + recurrent:4d} tensors ({initial} initial_inference, {recurrent} "
            f"recurrent_inference fields), {bad} mismatches")
