"""The files this process created, and the reaper process that removes them after it.

Every shared-memory file an owner creates is listed in :data:`owned` *before* the file exists,
and mirrored, one line per change, to a small reaper process (:mod:`concurrent_kv._reaper_main`)
over a pipe. The reaper unlinks whatever is still listed when the pipe closes, which the kernel
does when the owner ends, however it ends (normal exit, exception, SIGKILL, OOM kill). So no
file outlives its owner by more than the few milliseconds the reaper needs to notice.

Costs stay off the hot paths: one ``Popen`` per owner process, at its first segment, and one
small pipe write per segment created or closed. The pipe's write end is close-on-exec (exec'd
children never hold it), and a forked child closes its copy at once (:meth:`OwnedPaths._after_fork`):
so the files' names live exactly as long as the process that created them, never as long as a
stray child. A forked child that creates segments of its own gets a reaper of its own.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import warnings
from typing import List, Optional, Set

__all__ = ["OwnedPaths", "owned", "REAPER_SCRIPT"]

#: The reaper's body: a standalone file, run with ``-I -S`` so it imports nothing of ours.
REAPER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_reaper_main.py")


class OwnedPaths:
    """The paths this process created and has not removed, and the reaper that removes them
    if this process ends first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: Set[str] = set()
        self._reaper: Optional[subprocess.Popen] = None
        self._warned = False

    def add(self, path: str) -> None:
        """List ``path`` (call it before creating the file: a kill in between leaves nothing)."""
        line = _line(b"+", path)
        with self._lock:
            self._paths.add(path)
            self._tell(line)

    def discard(self, path: str) -> None:
        """Unlist ``path`` (this process removed it, or never managed to create it)."""
        with self._lock:
            if path in self._paths:
                self._paths.discard(path)
                self._tell(_line(b"-", path))

    def paths(self) -> List[str]:
        with self._lock:
            return sorted(self._paths)

    def reaper_pid(self) -> Optional[int]:
        """The reaper's pid, or None before the first segment (it starts lazily)."""
        with self._lock:
            return None if self._reaper is None else self._reaper.pid

    def unlink_all(self) -> None:
        """Remove every listed file now (at exit: at once, not a few milliseconds later)."""
        for path in self.paths():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self.discard(path)

    def stop_reaper(self) -> None:
        """Close the pipe: the reaper removes what is still listed and exits."""
        with self._lock:
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            _close_pipe(reaper)
            try:
                reaper.wait(1.0)  # it exits within milliseconds; not waiting would leave a zombie
            except subprocess.TimeoutExpired:
                pass

    # -- the reaper ------------------------------------------------------------------------

    def _tell(self, line: bytes) -> None:
        """Send one change to the reaper (caller holds the lock). A reaper that is not running
        (first segment, or it was killed) is started afresh and told every listed path."""
        reaper = self._reaper
        if reaper is not None and reaper.poll() is None:
            try:
                _write_all(reaper, line)
                return
            except OSError:
                _close_pipe(reaper)  # it died just now
        self._reaper = self._start()

    def _start(self) -> Optional[subprocess.Popen]:
        try:
            reaper = subprocess.Popen(
                [sys.executable, "-I", "-S", REAPER_SCRIPT, str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, bufsize=0,
                close_fds=True, start_new_session=True, cwd="/",
            )
            _write_all(reaper, b"".join(_line(b"+", p) for p in sorted(self._paths)))
            return reaper
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"concurrent_kv could not start its shared-memory reaper ({exc}): files of this "
                    "process are removed at close() or normal exit only; after a crash, run "
                    "`concurrent-kv shm clean`", RuntimeWarning, stacklevel=4,
                )
            return None

    def _after_fork(self) -> None:
        """In a forked child: the parent's files and reaper are not ours. Close our copy of
        the pipe, so the parent's files go when the *parent* ends."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._paths = set()
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            _close_pipe(reaper)
            reaper.returncode = 0  # not this process's child: nothing to wait for


def _line(op: bytes, path: str) -> bytes:
    raw = os.fsencode(path)
    if b"\n" in raw:
        raise ValueError(f"a shared-memory path cannot contain a newline: {path!r}")
    return op + raw + b"\n"


def _write_all(reaper: subprocess.Popen, data: bytes) -> None:
    assert reaper.stdin is not None
    fd = reaper.stdin.fileno()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_pipe(reaper: subprocess.Popen) -> None:
    # stdin is unbuffered (bufsize=0): closing it flushes nothing a forked child could duplicate.
    if reaper.stdin is not None:
        try:
            reaper.stdin.close()
        except OSError:
            pass


#: This process's owned paths.
owned = OwnedPaths()


@atexit.register
def _remove_owned_at_exit() -> None:
    """An owner that exits without close() removes its files at once; its reaper then exits."""
    owned.unlink_all()
    owned.stop_reaper()


os.register_at_fork(after_in_child=lambda: owned._after_fork())
