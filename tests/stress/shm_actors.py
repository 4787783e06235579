"""Owners and workers of a shared manager, as separate processes, for the leftover tests.

Each actor is a fresh interpreter (``python -m tests.stress.shm_actors owner|worker``), as a
spawned process is, talking JSON lines on stdin/stdout, so a test can SIGKILL it at a known
point. :func:`run_row` drives one way for an owner to end (the rows of issue 10's table) in a
private shared-memory folder and counts what is left there; ``python -m tests.stress.shm_actors
table`` prints the whole table.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
#: The issue's small manager: 2 envs, so 4 pools and 8 files.
SPEC_DIMS = (2, 1, 2, 4, 8)
CONFIG = {"num_simulations": 4}
ENV_NUM = 2
OWNER_KEYS = range(1, 5)
ROWS = {
    "return": "the script returns without close() (atexit runs)",
    "kill": "SIGKILLed",
    "kill-with-worker": "SIGKILLed while a worker is attached (the worker keeps working)",
    "kill-both": "owner and worker both SIGKILLed",
    "kill-with-forked-child": "SIGKILLed while a child it forked uses the pools (the child keeps working)",
}


# -- the actors (run in their own interpreter) --------------------------------------------------


def _say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _manager_parts() -> Tuple[Any, Any]:
    from concurrent_kv import EntrySpec
    from concurrent_kv.workload import fill_entry, verify_entry

    return EntrySpec(*SPEC_DIMS), (fill_entry, verify_entry)


def owner_main() -> None:
    """Create the manager, store a few entries, hand out the handle; then obey one command:
    ``return`` (end without close, as a script that forgets it), ``close``, or ``fork`` (a
    child inherits the manager and serves as a worker does; this process then only waits)."""
    import time

    import torch

    from concurrent_kv import KVCacheManager
    from concurrent_kv.reaper import owned

    torch.set_num_threads(1)
    spec, (fill_entry, _) = _manager_parts()
    manager = KVCacheManager(CONFIG, env_num=ENV_NUM, shared=True, entry_spec=spec)
    for key in OWNER_KEYS:
        manager.set_recur_cache(key, fill_entry(spec.empty_entry(), key))
    _say(ready=True, pid=os.getpid(), reaper=owned.reaper_pid(), handle=pickle.dumps(manager.handle()).hex())
    command = sys.stdin.readline().strip()
    if command == "close":
        manager.close()
    elif command == "fork":
        if os.fork() == 0:
            _serve(manager, spec)
            os._exit(0)
        time.sleep(600)  # killed by the test


def worker_main() -> None:
    """Attach by the handle on the first stdin line and serve (see :func:`_serve`)."""
    import torch

    from concurrent_kv import KVCacheManager

    torch.set_num_threads(1)
    spec, _ = _manager_parts()
    _serve(KVCacheManager.attach(pickle.loads(bytes.fromhex(sys.stdin.readline().strip()))), spec)


def _serve(manager: Any, spec: Any) -> None:
    """Check the owner's entries and write some; then per ``work`` line: read every key seen so
    far and write new ones, all verified; then close."""
    _, (fill_entry, verify_entry) = _manager_parts()
    keys = list(OWNER_KEYS)
    next_key = 100

    def round_trip() -> Dict[str, int]:
        nonlocal next_key
        reads = sum(verify_entry(manager.get_recur_cache(k), k) for k in keys)
        new = list(range(next_key, next_key + 4))
        next_key += 4
        for k in new:
            manager.set_recur_cache(k, fill_entry(spec.empty_entry(), k))
        writes = sum(verify_entry(manager.get_recur_cache(k), k) for k in new)
        counts = {"reads": len(keys), "verified_reads": reads, "writes": len(new), "verified_writes": writes}
        keys.extend(new)
        return counts

    _say(ready=True, pid=os.getpid(), **round_trip())
    for line in sys.stdin:
        if line.strip() != "work":
            break
        _say(**round_trip())
    manager.close()


def reapers_of(owner: int) -> List[int]:
    """Pids of the reaper processes started by ``owner`` (found by their command line)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"_reaper_main.py") for a in args) and str(owner).encode() in args:
            found.append(int(pid))
    return found


def reapers_gone(owner: int, seconds: float = 5.0) -> List[int]:
    """The reapers of ``owner`` still running after ``seconds`` (none, once they have exited):
    a reaper exits just after its last unlink, so under load it may outlive the files briefly."""
    deadline = time.monotonic() + seconds
    while True:
        left = reapers_of(owner)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


# -- driving them from a test -------------------------------------------------------------------


@contextlib.contextmanager
def private_shm_dir() -> Iterator[str]:
    """A fresh folder on tmpfs (``/dev/shm`` when it allows subfolders), set as
    ``CONCURRENT_KV_SHM_DIR`` for this process and its children; removed afterwards."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="concurrent-kv-test-", dir=base)
    before = os.environ.get("CONCURRENT_KV_SHM_DIR")
    os.environ["CONCURRENT_KV_SHM_DIR"] = folder
    try:
        yield folder
    finally:
        if before is None:
            del os.environ["CONCURRENT_KV_SHM_DIR"]
        else:
            os.environ["CONCURRENT_KV_SHM_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def usage(folder: str) -> Tuple[int, int]:
    """(files, bytes) in ``folder``."""
    sizes = [e.stat(follow_symlinks=False).st_size for e in os.scandir(folder)]
    return len(sizes), sum(sizes)


def settle(folder: str, seconds: float = 5.0) -> Tuple[int, int]:
    """(files, bytes) once the folder is empty, or after ``seconds``: cleanup is asynchronous
    (a reaper process), so a test waits for it, boundedly."""
    deadline = time.monotonic() + seconds
    while True:
        now = usage(folder)
        if now[0] == 0 or time.monotonic() >= deadline:
            return now
        time.sleep(0.05)


class Actor:
    """One actor process with a JSON-lines conversation."""

    def __init__(self, role: str, folder: str) -> None:
        env = dict(os.environ, CONCURRENT_KV_SHM_DIR=folder, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stress.shm_actors", role], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 60.0) -> Dict[str, Any]:
        stdout: Optional[IO[str]] = self.proc.stdout
        assert stdout is not None
        import select

        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            self.kill()
            raise RuntimeError(f"actor {self.proc.args[-1]} said nothing (exit code {self.proc.poll()})")
        return json.loads(line)

    def receive_eof(self, timeout: float = 30.0) -> None:
        """Wait until every process writing to this actor's stdout has closed it (exited)."""
        stdout = self.proc.stdout
        assert stdout is not None
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready and not stdout.readline():
                return
        raise RuntimeError("the actor's pipe stayed open")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        return code


@dataclass
class RowResult:
    """What one way of ending the owner left, and what the worker (if any) managed after."""

    row: str
    files_before: int = 0
    bytes_before: int = 0
    files: int = 0
    bytes: int = 0
    files_while_worker_lives: Optional[int] = None
    worker: Optional[Dict[str, int]] = None
    attach_error: Optional[str] = None
    reapers_left: int = 0


def _attach_error(handle_hex: str) -> str:
    """What a new attach to the dead owner's handle raises (class name: message), in this process."""
    from concurrent_kv import KVCacheManager

    try:
        KVCacheManager.attach(pickle.loads(bytes.fromhex(handle_hex))).close()
    except Exception as exc:  # the test checks which
        return f"{type(exc).__name__}: {exc}"
    return "attached"


def _worker_after_owner(result: RowResult, worker: Actor, folder: str, handle_hex: str) -> None:
    """The owner is dead: count the files, have the worker read and write, try a new attach."""
    result.files_while_worker_lives = settle(folder)[0]
    worker.send("work")
    result.worker = worker.receive()
    result.attach_error = _attach_error(handle_hex)
    worker.send("exit")


def run_row(row: str, folder: str) -> RowResult:
    """End an owner the way ``row`` says (see :data:`ROWS`); count what is left in ``folder``."""
    if row not in ROWS:
        raise ValueError(f"row must be one of {sorted(ROWS)}, got {row!r}")
    owner = Actor("owner", folder)
    hello = owner.receive()
    worker: Optional[Actor] = None
    result = RowResult(row)
    result.files_before, result.bytes_before = usage(folder)
    child = 0
    try:
        if row in ("kill-with-worker", "kill-both"):
            worker = Actor("worker", folder)
            worker.send(hello["handle"])
            worker.receive()
        elif row == "kill-with-forked-child":
            owner.send("fork")
            child = owner.receive()["pid"]  # the child talks on the owner's pipes
        if row == "return":
            owner.send("return")
            owner.wait()
        else:
            os.kill(owner.proc.pid, signal.SIGKILL)
            owner.proc.wait(30)
        if row == "kill-with-worker":
            assert worker is not None
            _worker_after_owner(result, worker, folder, hello["handle"])
            worker.wait()
        elif row == "kill-with-forked-child":
            _worker_after_owner(result, owner, folder, hello["handle"])
            owner.receive_eof()
        else:
            if worker is not None:
                worker.kill()
            result.attach_error = _attach_error(hello["handle"])
    finally:
        for actor in (owner, worker):
            if actor is not None and actor.proc.poll() is None:
                actor.kill()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        owner.wait()
    result.files, result.bytes = settle(folder)
    result.reapers_left = len(reapers_gone(hello["pid"]))
    return result


def table() -> str:
    """Issue 10's table, measured now: one private folder per row."""
    lines = ["| how the owner ends | files while it ran | files left | bytes left | notes |", "|---|---|---|---|---|"]
    for row, words in ROWS.items():
        with private_shm_dir() as folder:
            r = run_row(row, folder)
        notes: List[str] = []
        if r.worker is not None:
            notes.append("worker after the owner's death: {verified_reads}/{reads} reads and "
                         "{verified_writes}/{writes} writes verified".format(**r.worker))
        if r.files_while_worker_lives is not None:
            notes.append(f"files while it still works: {r.files_while_worker_lives}")
        if r.attach_error is not None:
            notes.append(f"new attach: {r.attach_error.split(':')[0]}")
        if r.reapers_left:
            notes.append(f"{r.reapers_left} reaper(s) still running")
        lines.append(f"| {words} | {r.files_before} ({r.bytes_before:,} B) | {r.files} | {r.bytes} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    actions = {"owner": owner_main, "worker": worker_main, "table": lambda: print(table())}
    if role not in actions:
        sys.exit(f"usage: python -m tests.stress.shm_actors {'|'.join(actions)}")
    actions[role]()
