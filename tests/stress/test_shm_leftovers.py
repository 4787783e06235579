"""No shared-memory file outlives its pool (issue 10): whichever way the owner ends, within a few
seconds of the last process mapping the pool ending, nothing of it is left in the folder.

Owners and workers are separate interpreters (``tests/stress/shm_actors.py``), each test in a
private ``CONCURRENT_KV_SHM_DIR`` on tmpfs, so xdist workers never see each other's files.
``python -m tests.stress.shm_actors table`` prints the table these tests check.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from . import shm_actors
from .shm_actors import Actor, private_shm_dir, run_row, settle, usage

pytestmark = [pytest.mark.stress, pytest.mark.timeout(60)]
FILES = 2 * (shm_actors.ENV_NUM + 2)  # two per pool: init pools, recur, wm


@pytest.fixture
def folder():
    with private_shm_dir() as path:
        yield path


@pytest.mark.parametrize("row", list(shm_actors.ROWS))
def test_nothing_is_left_however_the_owner_ends(row: str, folder: str) -> None:
    result = run_row(row, folder)
    assert result.files_before == FILES and result.bytes_before > 0
    assert (result.files, result.bytes) == (0, 0), f"left in {folder}: {os.listdir(folder)}"
    assert result.reapers_left == 0  # the reaper ended with its owner
    assert result.attach_error is not None and result.attach_error.startswith("AttachError"), result.attach_error
    if result.files_while_worker_lives is not None:  # a worker outlived the owner
        assert result.files_while_worker_lives == 0  # the names went with the owner; the mappings stay
        w = result.worker
        assert w is not None and w["reads"] > len(shm_actors.OWNER_KEYS)  # the owner's entries and its own
        assert (w["verified_reads"], w["verified_writes"]) == (w["reads"], w["writes"]), w


def _shm(command: str, folder: str, capsys: pytest.CaptureFixture[str]) -> dict:
    """``concurrent-kv shm <command> --json`` (in this process: a subprocess would import torch
    again, seconds each; ``tests/test_cli.py`` runs the module form)."""
    from concurrent_kv.cli import main

    assert main(["shm", command, "--json", "--dir", folder]) == 0
    return json.loads(capsys.readouterr().out)


def _crash_with_its_reaper(owner: Actor, hello: dict) -> None:
    """What nothing can clean up after: the reaper killed first (say ``kill -9 -1``), then the owner."""
    os.kill(hello["reaper"], signal.SIGKILL)
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.wait()


def test_shm_list_and_clean_after_a_crash_that_took_the_reaper_too(folder: str, capsys) -> None:
    from concurrent_kv import EntrySpec, KVCachePool

    live = KVCachePool(4, shared=True, entry_spec=EntrySpec(*shm_actors.SPEC_DIMS), name="live")
    foreign = os.path.join(folder, "ckv-" + "f" * 32 + "-foreign")
    with open(foreign, "wb") as f:
        f.write(b"not a segment")
    crashed, worker = Actor("owner", folder), Actor("worker", folder)
    try:
        hello = crashed.receive()
        worker.send(hello["handle"])
        worker.receive()
        _crash_with_its_reaper(crashed, hello)
        assert usage(folder)[0] == FILES + 3  # the crash's files stay: nothing removed them

        listing = _shm("list", folder, capsys)
        states = {(p["name"], p["state"]) for p in listing["pools"]}
        assert ("live", "alive") in states and ("recurrent", "orphaned") in states  # its worker still runs
        assert {f["problem"] for f in listing["others"]} == {"no concurrent_kv header"}
        assert _shm("clean", folder, capsys)["removed"] == []  # the worker still uses them

        worker.send("exit")
        worker.wait()
        listing = _shm("list", folder, capsys)
        dead = [p for p in listing["pools"] if p["owner_pid"] == hello["pid"]]
        assert len(dead) == 4 and {p["state"] for p in dead} == {"dead"} and len({p["manager"] for p in dead}) == 1
        report = _shm("clean", folder, capsys)
        assert len(report["removed"]) == FILES
        left = set(os.listdir(folder))
        assert left == {os.path.basename(p) for p in (live.handle().meta_path, live.handle().data_path, foreign)}
        live.set(1, shm_actors._manager_parts()[1][0](live.entry_spec.empty_entry(), 1))  # untouched, working
    finally:
        for actor in (crashed, worker):
            if actor.proc.poll() is None:
                actor.kill()
        live.close()
    assert settle(folder) == (1, len(b"not a segment"))
