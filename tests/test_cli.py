"""concurrent_kv/cli.py (over workload.py): the main job, ``python -m concurrent_kv demo``."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from concurrent_kv.cli import ProgressBar, format_table, main
from concurrent_kv.errors import ConfigError
from concurrent_kv.workload import WorkloadConfig


def test_demo_runs_and_verifies_every_read(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--envs", "4", "--collectors", "2", "--simulations", "5", "--steps", "6",
                 "--episode-length", "4", "--heads", "2", "--head-dim", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recurrent" in out and "init_env3" in out and "world_model" in out
    line = next(l for l in out.splitlines() if "verified against their key" in l)
    reads = line.split("hits: ")[1].split()[0]
    assert f"verified against their key: {reads}/{reads}" in line and "corrupt: 0" in line


def test_demo_as_a_module_with_progress_bar() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "concurrent_kv", "demo", "--envs", "2", "--collectors", "1", "--steps", "3",
         "--simulations", "3", "--heads", "2", "--head-dim", "8", "--lock", "mutex"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "6/6 env steps" in proc.stderr
    assert "lock: mutex" in proc.stdout


def test_demo_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--lock", "spin"])
    with pytest.raises(ConfigError):
        main(["demo", "--envs", "2", "--collectors", "3"])


def test_progress_bar_and_table_render() -> None:
    stream = io.StringIO()
    bar = ProgressBar(4, stream)
    for _ in range(4):
        bar.advance()
    assert "[##############################] 4/4" in stream.getvalue()
    table = format_table([["a", 1], ["bb", 22]], ["name", "n"])
    assert table.splitlines()[0] == "name   n" and table.splitlines()[-1] == "  bb  22"


@pytest.mark.parametrize("field,value", [("env_num", 0), ("steps", -1), ("head_dim", True), ("recur_clear", "x")])
def test_workload_config_validates(field: str, value: object) -> None:
    with pytest.raises(ConfigError):
        WorkloadConfig(**{field: value})
