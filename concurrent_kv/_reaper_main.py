"""The reaper: removes an owner's shared-memory files once the owner is gone, however it ended.

Run as ``python -I -S _reaper_main.py <owner pid>`` by :mod:`concurrent_kv.reaper`, never
imported: it must start in milliseconds and hold little memory, so it imports only built-in
modules (no torch, no site-packages, not even this package).

Protocol, on stdin, one line per change: ``+<path>`` (the owner created it) or ``-<path>`` (the
owner removed it itself). stdin reaches end-of-file when every holder of the pipe's write end
has closed it: the owner exiting normally, crashing or SIGKILLed (the kernel closes its
descriptors), or the owner closing the pipe on purpose. Then every path still listed is
unlinked and the reaper exits. Unlinking a name never disturbs a process that maps the file:
workers still attached keep their mappings and lock descriptors and go on working.

The reaper runs in its own session (started with ``start_new_session``) and ignores SIGINT,
SIGHUP and SIGTERM, so a Ctrl-C, a closed terminal or a signal to the owner's process group
does not take it down with the owner: it ends when its pipe does.
"""

import os
import signal
import stat
import sys


def unlink_if_ours(path: bytes) -> None:
    """Unlink ``path`` if it is still a regular file of this user (never follow a link)."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass  # already gone (the owner closed it, or `concurrent-kv shm clean` ran): nothing to do


def read_until_eof(fd: int) -> set:
    """The paths still listed when ``fd`` reaches end-of-file."""
    paths = set()
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break  # the pipe is unusable: treat it as closed
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                paths.add(line[1:])
            elif line[:1] == b"-":
                paths.discard(line[1:])
    return paths


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    for path in read_until_eof(sys.stdin.fileno()):
        unlink_if_ours(path)


if __name__ == "__main__":
    main()
