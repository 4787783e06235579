"""The shared-memory folder as ``concurrent-kv shm list|clean`` sees it: pools read without their
handles, and what no live process uses any more.

Reading takes no lock of the pool (a crashed owner may have left any state; a live one is never
slowed down): counters and occupancy are a racy, momentary view, good for display. Files are
read with ``pread``, never mapped, so reading does not count as using them.

A file is *ours* when its name has our prefix, it is a regular file (never a link) of this user,
and it starts with our magic. Anything else is listed as foreign, with the reason, and never
removed. One of ours is removed only when nothing uses it: its owner is dead (pid and start time,
so a reused pid does not count as alive), no worker recorded in its pool is alive, and no process
this user can see maps it or holds it open (``/proc/*/maps``, ``/proc/*/fd``). Run it in the
pid namespace of the processes that use the pools (a container's own ``/dev/shm``: inside it).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from .checks import boolean, instance_of
from .errors import ConcurrentKVError
from .shared import PoolDescription, read_description
from .shm import (
    HEADER_BYTES, HEADER_PREFIX, KIND_DATA, KIND_META, LAYOUT_VERSION, MAGIC, PREFIX, AttachError, Header,
    _digest_field, pid_alive, shm_dir,
)
from .state import CELL, DESCRIPTION_BYTES, READY, WORKER_ROWS, MetaLayout
from .stats import COUNTERS, HITS, MISSES

__all__ = ["SegmentFile", "PoolReport", "Listing", "CleanReport", "scan", "clean", "used_paths"]

KINDS = {KIND_META: "meta", KIND_DATA: "data"}


@dataclass(frozen=True)
class SegmentFile:
    """One file with our prefix. ``problem`` says why it is not a readable segment of ours ("" if
    it is); ``foreign`` ones are never removed."""

    name: str
    path: str
    size: int
    mtime: float
    kind: str = ""
    version: int = 0
    owner_pid: int = 0
    owner_alive: bool = False
    in_use: bool = False
    problem: str = ""
    foreign: bool = False

    @property
    def unused(self) -> bool:
        """Ours, its owner dead, and no process maps it or holds it open."""
        return not self.foreign and not self.owner_alive and not self.in_use


@dataclass(frozen=True)
class PoolReport:
    """A pool read from its meta segment (and its data segment, when present)."""

    name: str
    manager: str
    owner_pid: int
    owner_alive: bool
    workers: Tuple[int, ...]  # live processes attached, besides the owner
    size: int  # bytes of both files
    age_s: float
    capacity: int
    live: int
    pinned: int
    hits: int
    misses: int
    hit_rate: float
    state: str  # "alive", "orphaned" (owner dead, still used), "dead" (nothing uses it)
    meta: SegmentFile
    data: Optional[SegmentFile]


@dataclass(frozen=True)
class Listing:
    """Everything with our prefix in ``folder``: pools, and the other files (segments of another
    layout version, data without its metadata, foreign files), each with its problem."""

    folder: str
    pools: Tuple[PoolReport, ...]
    others: Tuple[SegmentFile, ...]


@dataclass
class CleanReport:
    """What :func:`clean` removed (or would, with ``dry_run``) and what it kept, with why."""

    folder: str
    removed: List[str] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)
    freed_bytes: int = 0


# -- who uses a file ----------------------------------------------------------------------------


def _proc_entries(pid: str) -> Iterator[str]:
    """Paths a process maps (``maps``) or holds open (``fd``), as far as we may look."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    yield os.fsdecode(parts[5].rstrip(b"\n"))
    except OSError:
        pass  # gone meanwhile, or another user's: it cannot map our 0600 files anyway
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            yield os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass


def used_paths(folder: str) -> Set[str]:
    """Paths in ``folder`` that some process we can see maps or holds open."""
    real = os.path.realpath(folder) + os.sep
    used: Set[str] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            used.update(p for p in _proc_entries(pid) if p.startswith(real))
    return used


# -- reading one file ---------------------------------------------------------------------------


def _foreign(entry: os.DirEntry, st: os.stat_result, why: str) -> SegmentFile:
    return SegmentFile(entry.name, entry.path, st.st_size, st.st_mtime, problem=why, foreign=True)


def _open_ours(entry: os.DirEntry) -> Tuple[Optional[int], os.stat_result, str]:
    """A read-only descriptor of ``entry`` if it may be ours, else None and why not."""
    st = entry.stat(follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        return None, st, "a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return None, st, "not a regular file"
    if st.st_uid != os.geteuid():
        return None, st, f"another user's (uid {st.st_uid})"
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(entry.path, flags), st, ""
    except OSError as exc:
        return None, st, f"unreadable ({exc.strerror})"


def _segment(entry: os.DirEntry, fd: int, st: os.stat_result, used: Set[str]) -> SegmentFile:
    """A file of ours (name, owner) from its header; ``problem`` set if of another layout."""
    raw = os.pread(fd, HEADER_BYTES, 0)
    if len(raw) < HEADER_PREFIX.size or raw[:8] != MAGIC:
        return SegmentFile(entry.name, entry.path, st.st_size, st.st_mtime,
                           problem="no concurrent_kv header", foreign=True)
    _, version, kind, pid, _ = HEADER_PREFIX.unpack_from(raw)
    in_use = os.path.realpath(entry.path) in used
    if version != LAYOUT_VERSION or len(raw) < HEADER_BYTES:
        # Another version's header: only its first fields are known; its owner's start time is not.
        return SegmentFile(entry.name, entry.path, st.st_size, st.st_mtime, version=version, owner_pid=pid,
                           owner_alive=pid_alive(pid), in_use=in_use, problem=f"unknown layout (version {version})")
    head = Header.read(raw)
    return SegmentFile(entry.name, entry.path, st.st_size, st.st_mtime, KINDS.get(kind, "plain"), version,
                       pid, head.owner_alive(), in_use)


def _read_file(entry: os.DirEntry, used: Set[str]) -> Tuple[SegmentFile, Optional[int]]:
    """The file's summary, and a descriptor to read more of it (a meta segment), or None."""
    fd, st, why = _open_ours(entry)
    if fd is None:
        return _foreign(entry, st, why), None
    try:
        seg = _segment(entry, fd, st, used)
    except BaseException:
        os.close(fd)
        raise
    if seg.kind == "meta" and not seg.problem:
        return seg, fd
    os.close(fd)
    return seg, None


# -- reading a pool -----------------------------------------------------------------------------


def _cells(fd: int, layout: MetaLayout, region: str, count: Optional[int] = None) -> np.ndarray:
    """The first ``count`` cells (default all) of a region, read from the file."""
    r = layout.regions[region]
    nbytes = CELL * (r.count if count is None else min(count, r.count))
    raw = os.pread(fd, nbytes, HEADER_BYTES + r.offset)
    if len(raw) != nbytes:
        raise AttachError(f"region {region} lies past the end of the file")
    return np.frombuffer(raw, dtype=np.int64)


def _layout(fd: int, seg: SegmentFile) -> Tuple[PoolDescription, MetaLayout]:
    """The description and the layout it implies, checked against the header's digest."""
    desc = read_description(os.pread(fd, DESCRIPTION_BYTES, HEADER_BYTES), seg.path)
    h = desc.handle
    try:
        layout = MetaLayout(h.capacity, h.policy, h.entry_spec(), h.max_workers)
    except (AttributeError, TypeError, ValueError, ConcurrentKVError) as exc:
        raise AttachError(f"{seg.path!r}: its description does not make a layout ({exc})") from None
    if Header.read(os.pread(fd, HEADER_BYTES, 0)).digest != _digest_field(layout.digest()):
        raise AttachError(f"{seg.path!r}: its description does not match its layout digest")
    return desc, layout


def _pool(fd: int, seg: SegmentFile, data: Optional[SegmentFile], desc: PoolDescription,
          layout: MetaLayout) -> PoolReport:
    h = desc.handle
    # Only the worker rows ever used (a pool may have 64 rows of millions of pins).
    rows = max(1, min(int(_cells(fd, layout, "scalars")[WORKER_ROWS]), h.max_workers))
    pids, starts = _cells(fd, layout, "worker_pid", rows), _cells(fd, layout, "worker_start", rows)
    workers = tuple(int(p) for p, s in zip(pids, starts)
                    if p and p != seg.owner_pid and pid_alive(int(p), int(s)))
    stats = _cells(fd, layout, "stats", rows * len(COUNTERS)).reshape(rows, -1).sum(axis=0)
    pins = _cells(fd, layout, "pins", rows * h.capacity).reshape(rows, h.capacity).sum(axis=0)
    hits, misses = int(stats[HITS]), int(stats[MISSES])
    used = seg.in_use or (data is not None and data.in_use)
    state = "alive" if seg.owner_alive else ("orphaned" if workers or used else "dead")
    return PoolReport(
        h.name, desc.manager, seg.owner_pid, seg.owner_alive, workers, seg.size + (data.size if data else 0),
        max(0.0, time.time() - desc.created), h.capacity, int((_cells(fd, layout, "slot_state") == READY).sum()),
        int((pins > 0).sum()), hits, misses, hits / (hits + misses) if hits + misses else 0.0, state, seg, data,
    )


# -- the folder ---------------------------------------------------------------------------------


def _entries(folder: str) -> List[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if e.name.startswith(PREFIX)), key=lambda e: e.name)


def scan(folder: Optional[str] = None) -> Listing:
    """Read every file with our prefix in ``folder`` (default: :func:`~concurrent_kv.shm.shm_dir`)."""
    folder = _folder(folder)
    used = used_paths(folder)
    files: Dict[str, SegmentFile] = {}
    metas: List[Tuple[SegmentFile, PoolDescription, MetaLayout, int]] = []
    for entry in _entries(folder):
        try:
            seg, fd = _read_file(entry, used)
        except FileNotFoundError:
            continue  # removed while we looked
        if fd is not None:
            try:
                desc, layout = _layout(fd, seg)
                metas.append((seg, desc, layout, fd))
                continue
            except AttachError as exc:
                os.close(fd)
                seg = _with_problem(seg, f"unreadable description: {exc}")
        files[seg.name] = seg
    pools = []
    for seg, desc, layout, fd in metas:
        try:
            pools.append(_pool(fd, seg, files.pop(os.path.basename(desc.handle.data_path), None), desc, layout))
        except AttachError as exc:
            files[seg.name] = _with_problem(seg, str(exc))
        finally:
            os.close(fd)
    others = tuple(_with_problem(f, "data without its pool's metadata") if f.kind == "data" and not f.problem else f
                   for f in files.values())
    return Listing(folder, tuple(sorted(pools, key=lambda p: (p.manager, p.name))), others)


def _with_problem(seg: SegmentFile, why: str) -> SegmentFile:
    return SegmentFile(seg.name, seg.path, seg.size, seg.mtime, seg.kind, seg.version, seg.owner_pid,
                       seg.owner_alive, seg.in_use, why, seg.foreign)


def _folder(folder: Optional[str]) -> str:
    folder = shm_dir() if folder is None else instance_of("folder", folder, str)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder!r} is not a folder (the shared-memory folder to read)")
    return folder


# -- cleaning -----------------------------------------------------------------------------------


def _pool_verdict(pool: PoolReport) -> str:
    """Why ``pool`` must stay ("" if it may go)."""
    if pool.owner_alive:
        return f"owner {pool.owner_pid} is alive"
    if pool.workers:
        return f"worker(s) {', '.join(map(str, pool.workers))} alive"
    if pool.meta.in_use or (pool.data is not None and pool.data.in_use):
        return "a process still maps it"
    return ""


def _file_verdict(seg: SegmentFile) -> str:
    if seg.foreign:
        return f"not ours: {seg.problem}"
    if seg.owner_alive:
        return f"owner {seg.owner_pid} is alive"
    if seg.in_use:
        return "a process still maps it"
    return ""


def clean(folder: Optional[str] = None, dry_run: bool = False) -> CleanReport:
    """Remove the files in ``folder`` that no live process uses (see the module's doc); keep
    the rest, saying why. ``dry_run`` only says what it would remove."""
    boolean("dry_run", dry_run)
    listing = scan(folder)
    report = CleanReport(listing.folder)
    for pool in listing.pools:
        why = _pool_verdict(pool)
        files: Sequence[Optional[SegmentFile]] = (pool.meta, pool.data)
        for seg in files:
            if seg is not None:  # the data file is checked on its own too: its name came from a file
                _settle(report, seg, (why or _file_verdict(seg)) if seg is pool.data else why, dry_run)
    for seg in listing.others:
        _settle(report, seg, _file_verdict(seg), dry_run)
    return report


def _settle(report: CleanReport, seg: SegmentFile, why: str, dry_run: bool) -> None:
    if why:
        report.kept.append((seg.name, why))
        return
    if not dry_run:
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            return  # its owner's reaper, or another clean, was quicker
    report.removed.append(seg.name)
    report.freed_bytes += seg.size
