"""Put :class:`~concurrent_kv.KVCacheManager` where LightZero's main branch builds its own manager.

LightZero's main branch (checked at 9f717c80) ships the starting design's ``KVCacheManager`` as
``lzero/model/unizero_world_models/kv_cache_manager.py``; ``world_model.py`` builds it when
``use_new_cache_manager=True``. :class:`~concurrent_kv.KVCacheManager` takes the same constructor
arguments and offers every attribute and method LightZero's code uses on it
(:data:`MAIN_BRANCH_SURFACE`), so the class itself can stand there. :func:`use_for_main_branch`
puts it there, or, given a shared manager's handle, a class that attaches to that manager when
the world model builds it (in a worker process).

Compatibility surface kept for the main branch, and only for it: the constructor's
``clear_recur_log_freq`` / ``clear_all_log_freq``, ``KVCachePool._key_to_index`` (a read-only
snapshot, see :meth:`~concurrent_kv.KVCachePool.key_index`) and ``KVCachePool.enable_stats``.
Nothing here imports LightZero until :func:`use_for_main_branch` is called.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, Dict, Optional, Tuple, Type, Union

from ..checks import boolean, non_negative_int, positive_int
from ..collector import CollectorCaches
from ..config import ManagerConfig
from ..errors import ConfigError
from ..manager import KVCacheManager, ManagerHandle
from .lightzero import IntegrationError

__all__ = [
    "use_for_main_branch",
    "check_main_branch_manager",
    "attached_manager_class",
    "AttachedKVCacheManager",
    "Replacement",
    "LIGHTZERO_MODULE",
    "CONSTRUCTOR",
    "MAIN_BRANCH_SURFACE",
]

#: Where the main branch defines its manager.
LIGHTZERO_MODULE = "lzero.model.unizero_world_models.kv_cache_manager"
#: The main branch's constructor parameters, in order (world_model.py passes all five by name).
CONSTRUCTOR = ("config", "env_num", "enable_stats", "clear_recur_log_freq", "clear_all_log_freq")
#: The methods of the main branch's manager; a class without one of them is not the manager we replace.
MANAGER_METHODS = (
    "get_init_cache", "set_init_cache", "get_recur_cache", "set_recur_cache", "get_wm_cache", "set_wm_cache",
    "hierarchical_get", "clear_all", "clear_init_caches", "clear_recur_cache", "get_stats_summary", "reset_stats",
)
#: What LightZero's code (lzero/, 9f717c80) uses on ``kv_cache_manager``, on its pools and on the
#: stats summary. tests/lightzero_head/test_surface.py re-reads the main branch's source and fails
#: when it uses anything not listed here.
MAIN_BRANCH_SURFACE: Dict[str, Tuple[str, ...]] = {
    "manager": (
        "clear_all", "clear_recur_cache", "get_init_cache", "get_recur_cache", "get_stats_summary",
        "hierarchical_get", "init_pools", "keys_values_wm_list", "keys_values_wm_size_list", "recur_pool",
        "set_init_cache", "set_recur_cache",
    ),
    "pool": ("_key_to_index", "clear"),
    "summary": ("stats_enabled",),
}

#: module name -> the class that stood there before the first replacement.
_ORIGINALS: Dict[str, type] = {}


class AttachedKVCacheManager(KVCacheManager):
    """What a worker's world model builds after ``use_for_main_branch(handle=...)``.

    It takes the main branch's constructor arguments and ignores the sizes they imply: it attaches
    to the shared manager behind the handle and works as one collector of it
    (:class:`~concurrent_kv.collector.CollectorCaches`): its ``init_pools`` are the shared init
    pools ``env_offset`` .. ``env_offset + env_num - 1``, claimed alone; its recur and wm pools are
    the shared ones, where it holds what it stores. The world model clears the recur pool at every
    MCTS search; here that releases only this collector's entries, so the other collectors'
    searches keep theirs.
    """

    _handle: ClassVar[Optional[ManagerHandle]] = None
    _env_offset: ClassVar[int] = 0

    def __init__(
        self,
        config: Any,
        env_num: int,
        enable_stats: bool = True,
        clear_recur_log_freq: int = 1000,
        clear_all_log_freq: int = 100,
    ) -> None:
        handle, offset = type(self)._handle, type(self)._env_offset
        if handle is None:
            raise IntegrationError("AttachedKVCacheManager needs a handle: build the class with attached_manager_class()")
        positive_int("env_num", env_num)
        boolean("enable_stats", enable_stats)
        non_negative_int("clear_recur_log_freq", clear_recur_log_freq)
        non_negative_int("clear_all_log_freq", clear_all_log_freq)
        if offset + env_num > handle.env_num:
            raise ConfigError(
                f"the world model has env_num={env_num}, but from env_offset={offset} the shared manager "
                f"has {max(0, handle.env_num - offset)} init pools (it has env_num={handle.env_num})"
            )
        cfg = ManagerConfig.from_any(config)
        spec = handle.pools[0].entry_spec()
        wanted = cfg.entry_spec()
        if wanted is not None and wanted != spec:
            raise ConfigError(f"the world model's entries are {wanted}; the shared pools hold {spec}")
        self._shared_manager = KVCacheManager.attach(handle)
        try:
            self._collector = self._shared_manager.collector(offset, env_num)
        except BaseException:
            self._shared_manager.close()
            raise
        c = self._collector
        self._assemble(cfg, env_num, enable_stats, True, [*c.init_pools, c.recur_pool, c.wm_pool],
                       clear_recur_log_freq, clear_all_log_freq)

    def handle(self) -> ManagerHandle:
        """The shared manager's handle (every pool), to give to other workers."""
        return self._shared_manager.handle()

    @property
    def collector_view(self) -> CollectorCaches:
        """This world model's view of the shared manager (its own counts, the keys it holds)."""
        return self._collector

    # The calls go through this world model's collector view of the shared manager.

    def get_init_cache(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        return self._collector.get_init_cache(env_id, cache_key, out)

    def set_init_cache(self, env_id: int, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        return self._collector.set_init_cache(env_id, cache_key, kv_cache, priority)

    def get_recur_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        return self._collector.get_recur_cache(cache_key, out)

    def set_recur_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        return self._collector.set_recur_cache(cache_key, kv_cache, priority)

    def get_wm_cache(self, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        return self._collector.get_wm_cache(cache_key, out)

    def set_wm_cache(self, cache_key: int, kv_cache: Any, priority: Optional[float] = None) -> int:
        return self._collector.set_wm_cache(cache_key, kv_cache, priority)

    def hierarchical_get(self, env_id: int, cache_key: int, out: Optional[Any] = None) -> Optional[Any]:
        return self._collector.hierarchical_get(env_id, cache_key, out)

    def clear_init_caches(self, env_id: Optional[int] = None) -> None:
        self._collector.clear_init_caches(env_id)

    def clear_recur_cache(self) -> None:
        """Release this collector's recur entries (the others' stay)."""
        self._collector.clear_recur_cache()
        self._log_clear("recur", "Cleared recurrent inference cache")

    def clear_all(self) -> None:
        """Empty this collector's root pools and release its recur and wm entries."""
        self._collector.clear_all()
        self.keys_values_wm_list.clear()
        self.keys_values_wm_size_list.clear()
        self._log_clear("all", "Cleared all KV caches")

    def close(self) -> None:
        """Release this collector's entries and claims, then detach from the shared manager."""
        self._closed = True
        self._collector.close()
        self._shared_manager.close()


def attached_manager_class(handle: ManagerHandle, env_offset: int = 0) -> Type[AttachedKVCacheManager]:
    """A manager class that, when LightZero builds it, attaches to the shared manager ``handle``
    and uses its init pools from ``env_offset`` on (see :class:`AttachedKVCacheManager`)."""
    if not isinstance(handle, ManagerHandle):
        raise ConfigError(f"handle must be a ManagerHandle (from KVCacheManager.handle()), got {type(handle).__name__}")
    non_negative_int("env_offset", env_offset)
    if env_offset >= handle.env_num:
        raise ConfigError(f"env_offset must be below the shared manager's env_num ({handle.env_num}), got {env_offset}")
    return type("AttachedKVCacheManager", (AttachedKVCacheManager,),
                {"_handle": handle, "_env_offset": env_offset, "__module__": __name__})


def check_main_branch_manager(cls: Any) -> None:
    """Raise :class:`IntegrationError` unless ``cls`` is the manager class we know how to replace:
    the constructor ``(self, *CONSTRUCTOR)`` and every method in ``MANAGER_METHODS``."""
    if not isinstance(cls, type):
        raise IntegrationError(f"expected LightZero's KVCacheManager class, got {type(cls).__name__}")
    try:
        params = tuple(inspect.signature(cls).parameters)
    except (TypeError, ValueError) as exc:
        raise IntegrationError(f"cannot read {cls.__qualname__}'s constructor: {exc}") from None
    problems = []
    if params != CONSTRUCTOR:
        problems.append(f"its constructor takes ({', '.join(params)}), expected ({', '.join(CONSTRUCTOR)})")
    missing = [m for m in MANAGER_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        problems.append(f"it lacks {', '.join(missing)}")
    if problems:
        raise IntegrationError(
            f"{cls.__module__}.{cls.__qualname__} is not the LightZero main-branch KVCacheManager concurrent_kv "
            f"replaces (9f717c80): {'; '.join(problems)}. Use concurrent_kv.integrations.lightzero.attach for "
            "LightZero 0.2.0, or update this module for the newer manager."
        )


@dataclass(frozen=True)
class Replacement:
    """What :func:`use_for_main_branch` did: which class now stands where, in which modules."""

    original: type
    replacement: type
    modules: Tuple[str, ...]
    handle: Optional[ManagerHandle] = None
    env_offset: int = 0
    _objects: Tuple[ModuleType, ...] = field(default=(), repr=False, compare=False)

    def undo(self) -> None:
        """Put the original class back wherever this replacement put ours."""
        for module in self._objects:
            if module.__dict__.get("KVCacheManager") is self.replacement:
                setattr(module, "KVCacheManager", self.original)

    def __enter__(self) -> "Replacement":
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __str__(self) -> str:
        where = ", ".join(self.modules)
        how = "" if self.handle is None else f" (attaching to a shared manager from env {self.env_offset})"
        return f"{self.original.__module__}.{self.original.__qualname__} -> {self.replacement.__qualname__}{how} in {where}"


def _resolve(module: Union[str, ModuleType]) -> ModuleType:
    if isinstance(module, ModuleType):
        return module
    if not isinstance(module, str) or not module or module.startswith(".") or "\x00" in module:
        raise ConfigError(f"module must be a module or an absolute dotted module name, got {module!r}")
    try:
        return importlib.import_module(module)
    except Exception as exc:  # not found, or failed while importing (a missing dependency, ...)
        raise IntegrationError(
            f"cannot import {module} ({type(exc).__name__}: {exc}): put LightZero's main-branch source first "
            "on sys.path (its model needs transformers)"
        ) from None


def use_for_main_branch(
    handle: Optional[ManagerHandle] = None,
    *,
    env_offset: int = 0,
    module: Union[str, ModuleType] = LIGHTZERO_MODULE,
) -> Replacement:
    """Make LightZero's main-branch world model build concurrent_kv's manager; return what was replaced.

    Call it before the model is built. Without ``handle``, world models build
    :class:`~concurrent_kv.KVCacheManager` itself (thread-safe, in this process). With a shared
    manager's ``handle`` (``KVCacheManager(..., shared=True).handle()``), each world model built in
    this process attaches to that manager's init pools from ``env_offset`` on (see
    :class:`AttachedKVCacheManager`). The class is replaced in ``module`` and in every loaded module
    of the same package that imported the name (``world_model`` does, lazily, at this commit).
    Raises :class:`IntegrationError` when the class found there is not the manager we replace.
    """
    if handle is not None and not isinstance(handle, ManagerHandle):
        raise ConfigError(f"handle must be None or a ManagerHandle, got {type(handle).__name__}")
    non_negative_int("env_offset", env_offset)
    if handle is None and env_offset:
        raise ConfigError("env_offset selects init pools of a shared manager: pass its handle too")
    mod = _resolve(module)
    current = mod.__dict__.get("KVCacheManager")
    if current is None:
        raise IntegrationError(f"{mod.__name__} defines no KVCacheManager: not LightZero's main branch")
    ours = isinstance(current, type) and issubclass(current, KVCacheManager)
    original = _ORIGINALS.get(mod.__name__, current) if ours else current
    if not ours:
        check_main_branch_manager(current)
    replacement: type = KVCacheManager if handle is None else attached_manager_class(handle, env_offset)
    root = mod.__name__.split(".")[0]
    targets = {id(mod): mod}
    for name, m in list(sys.modules.items()):
        if isinstance(m, ModuleType) and (name == root or name.startswith(root + ".")):
            held = m.__dict__.get("KVCacheManager")
            if held is not None and (held is current or held is original):
                targets[id(m)] = m
    for m in targets.values():
        setattr(m, "KVCacheManager", replacement)
    _ORIGINALS.setdefault(mod.__name__, original)
    objects = tuple(sorted(targets.values(), key=lambda m: m.__name__))
    return Replacement(original, replacement, tuple(m.__name__ for m in objects), handle, env_offset, objects)
