"""Shared-memory segments: create (owner-only, unguessable names, space checked), attach
(header validated), clean up.

A segment is a file under ``/dev/shm`` (``CONCURRENT_KV_SHM_DIR`` overrides the folder) created
with mode 0600, ``O_EXCL`` and a random name, sized with ``posix_fallocate`` so that a full
tmpfs fails *here* with :class:`SharedMemoryError` rather than with a SIGBUS on first touch.
The first 64 bytes are a header: magic, layout version, kind (meta or data), owner pid and start
time, payload size and a layout digest that the attaching side must match. Nothing is ever
unpickled from shared memory.

Every file is listed with :data:`concurrent_kv.reaper.owned` before it is created, so it is
removed when its owner closes it, exits, or dies in any way (a reaper process sees to the last).
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from typing import List, NamedTuple, Optional, Sequence, Set, Union

import numpy as np
import torch

from .errors import ConcurrentKVError, ConfigError
from .reaper import owned

__all__ = [
    "SharedMemoryError", "AttachError", "Segment", "Header", "shm_dir", "leftover_segments", "remove_stale_segments",
    "pid_alive", "start_time",
]

MAGIC = b"CKVSEG01"
#: 2: the header records the owner's start time and the segment's kind; a meta segment starts
#: with a description of its pool (:func:`concurrent_kv.shared.describe`).
LAYOUT_VERSION = 2
PREFIX = "ckv-"
#: magic, version, kind, owner pid, payload bytes, owner start time, layout digest (24 bytes)
HEADER = struct.Struct("<8sIIQQQ24s")
#: The header's first fields, in the same place in every layout version: enough to tell a
#: segment of another version (``shm list``) and whose it is.
HEADER_PREFIX = struct.Struct("<8sIIQQ")
HEADER_BYTES = 64
#: Segment kinds (the header's kind field): plain, a pool's metadata, a pool's slot data.
KIND_PLAIN, KIND_META, KIND_DATA = 0, 1, 2


class Header(NamedTuple):
    magic: bytes
    version: int
    kind: int
    owner_pid: int
    payload: int
    owner_start: int
    digest: bytes

    @classmethod
    def read(cls, buf: Union[bytes, mmap.mmap]) -> "Header":
        return cls(*HEADER.unpack_from(buf, 0))

    def owner_alive(self) -> bool:
        return pid_alive(self.owner_pid, self.owner_start)


def _digest_field(digest: bytes) -> bytes:
    return digest[:24].ljust(24, b"\0")


class SharedMemoryError(ConcurrentKVError, OSError):
    """Shared memory could not be created: not enough space, or the system refused."""


class AttachError(ConcurrentKVError, ValueError):
    """A segment is missing, foreign, truncated, or its layout does not match the handle."""


def shm_dir() -> str:
    return os.environ.get("CONCURRENT_KV_SHM_DIR", "/dev/shm")


def new_name(label: str) -> str:
    """An unguessable segment name (128 random bits)."""
    safe = "".join(c if c.isalnum() else "_" for c in label)[:40]
    return f"{PREFIX}{secrets.token_hex(16)}-{safe}"


def _check_space(folder: str, nbytes: int) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise SharedMemoryError(
            f"shared memory needs {nbytes:,} bytes in {folder}, only {free:,} are free "
            "(raise it, e.g. docker --shm-size, or make the pools smaller)"
        )


def _create_file(path: str, total: int) -> mmap.mmap:
    """Create ``path`` (0600, never an existing file nor a link), reserve ``total`` bytes, map it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, total)  # reserve every page now: ENOSPC here, not SIGBUS later
        except OSError as exc:
            raise SharedMemoryError(f"could not reserve {total:,} bytes in {os.path.dirname(path)}: {exc}") from None
        return mmap.mmap(fd, total)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)  # the mapping keeps the memory; no descriptor stays open


def _check_header(path: str, head: Header, size: int, payload_bytes: int, digest: bytes) -> None:
    """Refuse, with :class:`AttachError`, a segment that is not the one a handle describes, or
    whose owner is gone (its files are about to be removed: attaching would race that)."""
    if head.magic != MAGIC:
        raise AttachError(f"segment {path!r} is not a concurrent_kv segment (bad magic)")
    if head.version != LAYOUT_VERSION:
        raise AttachError(f"segment {path!r} has layout version {head.version}, this build reads {LAYOUT_VERSION}")
    if head.payload != payload_bytes or size < HEADER_BYTES + payload_bytes:
        raise AttachError(
            f"segment {path!r} holds {size - HEADER_BYTES} payload bytes, the handle expects {payload_bytes}"
        )
    if head.digest != _digest_field(digest):
        raise AttachError(f"segment {path!r} has another layout (slot shape, dtype or capacity) than the handle")
    if not head.owner_alive():
        raise AttachError(f"segment {path!r}: its owner (pid {head.owner_pid}) is gone; the pool went with it")


class Segment:
    """One mapped shared-memory file. ``payload`` is a writable memoryview past the header."""

    def __init__(self, path: str, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self._mm: Optional[mmap.mmap] = mm
        self.owner = owner  # created by this process (a forked child of the creator is not it)
        self.owner_pid = Header.read(mm).owner_pid
        self._views: List[memoryview] = []

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @classmethod
    def create(cls, label: str, payload_bytes: int, digest: bytes, kind: int = KIND_PLAIN) -> "Segment":
        """A new file of ``payload_bytes`` past the header, owned by this process."""
        if kind not in (KIND_PLAIN, KIND_META, KIND_DATA):
            raise ConfigError(f"segment kind must be one of {KIND_PLAIN}, {KIND_META}, {KIND_DATA}, got {kind!r}")
        folder = shm_dir()
        total = HEADER_BYTES + payload_bytes
        _check_space(folder, total)
        path = os.path.join(folder, new_name(label))
        owned.add(path)  # before the file exists: from here on, no way of dying leaves it behind
        try:
            mm = _create_file(path, total)
        except BaseException:
            owned.discard(path)
            raise
        me = os.getpid()
        HEADER.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, kind, me, payload_bytes, start_time(me), _digest_field(digest))
        return cls(path, mm, owner=True)

    @classmethod
    def attach(cls, path: str, payload_bytes: int, digest: bytes) -> "Segment":
        if not os.path.basename(path).startswith(PREFIX) or os.path.dirname(path) != shm_dir():
            raise AttachError(f"{path!r} is not a concurrent_kv segment in {shm_dir()}")
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise AttachError(f"segment {path!r} does not exist (its owner closed it, or is gone)") from None
        except OSError as exc:
            raise AttachError(f"cannot open segment {path!r}: {exc}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise AttachError(f"segment {path!r} is truncated ({size} bytes, no header)")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        try:
            _check_header(path, Header.read(mm), size, payload_bytes, digest)
        except BaseException:
            mm.close()
            raise
        return cls(path, mm, owner=False)

    def view(self, offset: int, nbytes: int, fmt: str = "B") -> memoryview:
        """A view of ``nbytes`` payload bytes at ``offset``, cast to ``fmt``; released on close."""
        assert self._mm is not None
        base = memoryview(self._mm)[HEADER_BYTES + offset : HEADER_BYTES + offset + nbytes]
        view = base.cast(fmt) if fmt != "B" else base  # type: ignore[call-overload]  # fmt is a runtime str
        self._views.append(base)
        if view is not base:
            self._views.append(view)
        return view

    def array(self, offset: int, count: int) -> np.ndarray:
        """``count`` int64 cells of the payload at byte ``offset``, as a numpy view (for sweeps)."""
        assert self._mm is not None
        return np.frombuffer(self._mm, dtype=np.int64, count=count, offset=HEADER_BYTES + offset)

    def tensor(self, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The payload as a tensor of ``shape`` in torch shared memory (``from_file``, MAP_SHARED).

        torch maps the file on its own, so the tensor stays valid after :meth:`close` (its pages
        go when the last tensor does); the header is skipped, so ``HEADER_BYTES`` must be a
        multiple of the item size (it is, for every dtype up to 64 bytes)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = 1
        for d in shape:
            count *= d
        skip = HEADER_BYTES // itemsize
        flat = torch.from_file(self.path, shared=True, size=skip + count, dtype=dtype)
        return flat[skip:].view(*shape)

    def close(self, unlink: Optional[bool] = None) -> None:
        """Unmap (after releasing every view handed out); the owner also unlinks the file
        (``unlink`` overrides; a forked child of the owner never does by default)."""
        if self._mm is None:
            return
        for v in reversed(self._views):
            v.release()
        self._views.clear()
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does
        self._mm = None
        if (self.owner and self.owner_pid == os.getpid()) if unlink is None else unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            owned.discard(self.path)


def leftover_segments() -> List[str]:
    """Names of concurrent_kv segments present in the shared-memory folder."""
    try:
        return sorted(n for n in os.listdir(shm_dir()) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def start_time(pid: int) -> int:
    """A process's start time in clock ticks (tells a live pid from a reused one); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def pid_alive(pid: int, started: int = 0) -> bool:
    """Whether ``pid`` runs (not a zombie), and is the process that started at ``started`` if given."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    if fields[0] == b"Z":  # killed, not yet reaped by its parent: holds nothing any more
        return False
    return not started or int(fields[19]) == started


def remove_stale_segments() -> Set[str]:
    """Unlink the segments no live process uses (see :func:`concurrent_kv.shm_inspect.clean`);
    return their names."""
    from .shm_inspect import clean  # it reads pool layouts, which import this module

    if not os.path.isdir(shm_dir()):
        return set()  # no folder, nothing left in it
    return set(clean().removed)


def _unlink_owned_at_exit() -> None:
    """Remove this process's files now, as its exit would."""
    owned.unlink_all()
