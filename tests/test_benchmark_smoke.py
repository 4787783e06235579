"""benchmarks/kvbench: the package runs end to end in ``--quick`` mode and writes its results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("meta", "micro", "baselines", "trace", "memory", "hitrate", "goals", "notes")


@pytest.mark.timeout(180)  # the subprocess's own 120 s limit fires first, with its output
def test_benchmark_quick_writes_results(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kvbench", "--quick", "--no-progress", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "results.json").is_file()
    assert (tmp_path / "results.md").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    for key in SECTIONS:
        assert key in results, f"results.json lacks {key!r}"
    # Every trace run read only verified entries, and every goal has a status.
    runs = results["trace"]["runs"]
    assert runs and all(r["corrupt"] == 0 and r["errors"] == 0 for r in runs)
    assert results["goals"] and {g["status"] for g in results["goals"]} <= {"PASS", "MISS", "n/a"}
    # Only what --quick does not measure is n/a (besides sections it does not run, such as
    # unizero, which needs LightZero): a goal that lost its row would show up here.
    unmeasured = {g["id"] for g in results["goals"] if g["status"] == "n/a" and not g["note"].endswith("not run")}
    assert unmeasured <= {"processes:cache only", "processes:fill+verify", "shared_vs_ray"}, unmeasured
    assert "goals" in proc.stdout
