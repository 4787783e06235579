"""concurrent_kv/cli.py (over workload.py): the main job, ``python -m concurrent_kv demo``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import List

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


# -- `shm list` and `shm clean` -----------------------------------------------------------------


@pytest.fixture
def shm_folder(monkeypatch: pytest.MonkeyPatch):
    """A private shared-memory folder (on tmpfs when /dev/shm allows subfolders)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="concurrent-kv-test-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    monkeypatch.setenv("CONCURRENT_KV_SHM_DIR", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


DEAD_PID = 2**22 + 12345  # above the default pid_max: never a running process


def _dead_copy(pool, folder: str) -> List[str]:
    """Copies of ``pool``'s two files, as a run whose owner died would have left them (owner
    pid dead, nobody mapping them); the copy's description names the copied data file."""
    import numpy as np

    from concurrent_kv.shm import HEADER, Header
    from concurrent_kv.state import MetaLayout

    h = pool.handle()
    names = []
    for path in (h.data_path, h.meta_path):
        raw = bytearray(open(path, "rb").read())
        raw[: HEADER.size] = HEADER.pack(*Header.read(bytes(raw))._replace(owner_pid=DEAD_PID))
        if path == h.meta_path:  # same length: the random part is 32 hex digits either way
            raw = raw.replace(os.path.basename(h.data_path).encode(), names[0].encode(), 1)
            rows = MetaLayout(h.capacity, h.policy, h.entry_spec(), h.max_workers).regions["worker_pid"]
            pids = np.frombuffer(raw, np.int64, rows.count, HEADER.size + rows.offset)
            pids[pids != 0] = DEAD_PID  # its worker rows: the dead owner's
        name = "ckv-" + os.urandom(16).hex() + "-" + os.path.basename(path).split("-", 2)[2]
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)
        os.chmod(os.path.join(folder, name), 0o600)
        names.append(name)
    return names


def _old_segment(folder: str, owner: int) -> str:
    """A segment of layout version 1 (the header's first fields are where they always were)."""
    from concurrent_kv.shm import HEADER_PREFIX, MAGIC

    name = "ckv-" + os.urandom(16).hex() + "-old"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(HEADER_PREFIX.pack(MAGIC, 1, 0, owner, 64).ljust(128, b"\0"))
    return name


def test_shm_list_and_clean_tell_ours_dead_alive_old_and_foreign(shm_folder: str, capsys) -> None:
    import json

    from concurrent_kv import EntrySpec, KVCacheManager
    from concurrent_kv.workload import fill_entry

    spec = EntrySpec(2, 1, 2, 4, 8)
    with KVCacheManager({"num_simulations": 4}, env_num=2, shared=True, entry_spec=spec) as live:
        live.set_recur_cache(1, fill_entry(spec.empty_entry(), 1))
        live.get_recur_cache(1)
        live.get_recur_cache(2)
        dead = _dead_copy(live.recur_pool, shm_folder)
        old_dead, old_alive = _old_segment(shm_folder, DEAD_PID), _old_segment(shm_folder, os.getpid())
        foreign = "ckv-" + "0" * 32 + "-foreign"
        for name, content in ((foreign, b"garbage" * 20), ("not-ours", b"x")):
            with open(os.path.join(shm_folder, name), "wb") as f:
                f.write(content)
        os.symlink(live.recur_pool.handle().meta_path, os.path.join(shm_folder, "ckv-" + "1" * 32 + "-link"))

        assert main(["shm", "list", "--json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        pools = {(p["name"], p["state"]) for p in listing["pools"]}
        assert pools == {("init_env0", "alive"), ("init_env1", "alive"), ("recurrent", "alive"),
                         ("world_model", "alive"), ("recurrent", "dead")}
        recur = next(p for p in listing["pools"] if p["name"] == "recurrent" and p["owner_alive"])
        assert (recur["live"], recur["hits"], recur["misses"], recur["hit_rate"]) == (1, 1, 1, 0.5)
        assert len({p["manager"] for p in listing["pools"] if p["owner_alive"]}) == 1  # one manager
        problems = {f["name"]: f["problem"] for f in listing["others"]}
        assert problems[old_dead] == problems[old_alive] == "unknown layout (version 1)"
        assert "symbolic link" in problems["ckv-" + "1" * 32 + "-link"]
        assert problems[foreign] == "no concurrent_kv header" and "not-ours" not in problems

        assert main(["shm", "list"]) == 0
        text = capsys.readouterr().out
        assert "5 pools in 1 manager" in text and "dead" in text and "unknown layout" in text

        assert main(["shm", "clean", "--dry-run"]) == 0
        assert "would remove 3 files" in capsys.readouterr().out
        assert main(["shm", "clean"]) == 0
        out = capsys.readouterr().out
        assert "removed 3 files" in out
        left = set(os.listdir(shm_folder))
        assert not left & {*dead, old_dead}
        assert {old_alive, foreign, "not-ours", "ckv-" + "1" * 32 + "-link"} <= left
        assert all(os.path.exists(p) for h in live.handle().pools for p in (h.meta_path, h.data_path))
        live.check()


def test_shm_commands_run_as_a_module(shm_folder: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "concurrent_kv", "shm", "list", "--dir", shm_folder],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{shm_folder}: 0 pools in 0 managers")
    with pytest.raises(SystemExit):
        main(["shm"])  # which one: list or clean
    assert main(["shm", "clean", "--dir", os.path.join(shm_folder, "missing")]) == 2  # said on stderr


def test_shm_inspect_validates_its_arguments(shm_folder: str) -> None:
    from concurrent_kv import ConfigError
    from concurrent_kv.shm_inspect import clean, scan

    with pytest.raises(ConfigError):
        scan(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        clean(dry_run="yes")  # type: ignore[arg-type]
    with pytest.raises(NotADirectoryError):
        scan(os.path.join(shm_folder, "missing"))
    assert scan().pools == () and clean().removed == []
