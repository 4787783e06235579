"""Route a LightZero UniZero world model's KV caching through a :class:`KVCacheManager`.

``attach(world_model)`` adapts at the world model's cache *seams*, without copying its code:

* the key -> slot dicts (``past_kv_cache_init_infer_envs[env]``, ``past_kv_cache_recurrent_infer``)
  are replaced by maps over our pools: ``get(key)`` copies a hit into a staging entry and returns a
  token; ``map[key] = token`` deep-copies the world model's entry into the pool;
* the slot lists (``shared_pool_init_infer[env]``, ``shared_pool_recur_infer``) are replaced by
  views that turn a token back into its staged entry;
* the copy helpers (``custom_copy_kv_cache_to_shared_*``) stop copying: the maps do it, once.

The maps go through one collector's view of the manager
(:class:`~concurrent_kv.collector.CollectorCaches`): the world model's env ``i`` is the
collector's root pool ``i``, what it stores in the recur pool it holds, and ``clear_caches()`` or
the world model's own per-search ``.clear()`` release only its own entries, so several world
models (worker processes, torchrun ranks) share one ``shared=True`` manager without wiping each
other's search trees. A lookup that misses (an entry refused because every slot was held) makes
the world model recompute, where LightZero 0.2.0 would index its slot list with ``None``. Keys
may be LightZero 0.2.0's hex strings or the int digests of later versions.

Modes (LightZero's roll-out plan):

* ``"original"``: the world model's own caches, untouched (``use_new_cache_manager=False``);
* ``"new"``: our pools; the original structures are kept aside, so ``set_mode("original")``
  switches back at once (phase 1, side by side);
* ``"validate"``: the original caches drive the model; every lookup is mirrored in our pools and
  the hit/miss outcome and the retrieved tensors are compared (phase 2);
* ``"switch_over"``: our pools alone; the original slot lists are released (phase 3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..collector import CollectorCaches
from ..entry import EntrySpec, KeysValues, entry_tensors
from ..errors import ConcurrentKVError, ConfigError
from ..checks import boolean, instance_of, non_negative_int
from ..manager import KVCacheManager, ManagerHandle
from ..pool import KVCachePool

__all__ = [
    "attach",
    "enable",
    "LightZeroCacheAdapter",
    "IntegrationError",
    "ValidationMismatchError",
    "ValidationStats",
    "MODES",
    "SEAMS",
]

log = logging.getLogger(__name__)

MODES = ("original", "new", "validate", "switch_over")
#: What the adapter needs on a world model (LightZero 0.2.0's legacy cache).
SEAMS = (
    "past_kv_cache_init_infer_envs",
    "past_kv_cache_recurrent_infer",
    "shared_pool_init_infer",
    "shared_pool_recur_infer",
    "shared_pool_wm",
    "custom_copy_kv_cache_to_shared_init_envs",
    "custom_copy_kv_cache_to_shared_recur",
    "custom_copy_kv_cache_to_shared_wm",
    "clear_caches",
    "keys_values_wm_list",
)
_REPLACED = SEAMS[:8]


class IntegrationError(ConcurrentKVError, RuntimeError):
    """The object is not a world model this adapter can attach to."""


class ValidationMismatchError(ConcurrentKVError, AssertionError):
    """In validate mode, our pools disagreed with the original cache on a lookup."""


def _lightzero_version() -> str:
    try:
        from importlib.metadata import version

        return version("LightZero")
    except Exception:  # pragma: no cover - lightzero not installed as a distribution
        return "unknown"


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns, so that equal NaNs compare equal (floats only; others as they are)."""
    if t.is_floating_point() and t.element_size() in _SAME_WIDTH_INT:
        return t.contiguous().view(_SAME_WIDTH_INT[t.element_size()])
    return t


def _key(key: Any) -> int:
    """LightZero 0.2.0 keys are ``xxh64(...).hexdigest()`` strings; later ones are ints."""
    return int(key, 16) if isinstance(key, str) else int(key)


class _Pending:
    """What a replaced copy helper returns: the source entry, copied when the map stores it."""

    __slots__ = ("kv",)

    def __init__(self, kv: Any) -> None:
        self.kv = kv


class _Token:
    """What a map's ``get`` returns on a hit: the private staged copy."""

    __slots__ = ("entry",)

    def __init__(self, entry: Any) -> None:
        self.entry = entry


class _Staging:
    """A ring of private entries that hits are copied into (the world model's "wm" pool): the
    transformer may change them in place. Sized like the world model's own ring."""

    def __init__(self, size: int) -> None:
        self._entries: List[Optional[KeysValues]] = [None] * size
        self._next = 0

    def candidate(self, spec: Optional[EntrySpec]) -> Optional[KeysValues]:
        if spec is None:
            return None
        entry = self._entries[self._next]
        # The model may have swapped a staged entry's tensors: reuse it only while it is intact
        # (own_block is the pool's own cheap check; building EntrySpec.of here cost ~30 us a hit).
        if entry is None or spec.own_block(entry) is None:
            entry = self._entries[self._next] = spec.empty_entry()
        return entry

    def advance(self) -> None:
        self._next = (self._next + 1) % len(self._entries)

    def owns(self, kv: Any) -> bool:
        return any(kv is e for e in self._entries)

    def copy_in(self, kv: Any) -> KeysValues:
        entry = self.candidate(EntrySpec.of(kv))
        assert entry is not None
        tensors, sizes = entry_tensors(kv)
        with torch.no_grad():
            for dst, src, size in zip(entry._caches(), tensors, sizes):
                dst._cache.copy_(src)
                dst._size = int(size)
        self.advance()
        return entry


class _Route:
    """One of a collector's caches, as a world-model dict uses it: the root pool of env
    ``env_id``, or the shared recur pool when ``env_id`` is None."""

    def __init__(self, collector: CollectorCaches, env_id: Optional[int]) -> None:
        self.collector, self.env_id = collector, env_id
        self.pool: KVCachePool = collector.recur_pool if env_id is None else collector.init_pools[env_id]

    def get(self, key: int, out: Optional[Any]) -> Optional[Any]:
        c = self.collector
        return c.get_recur_cache(key, out) if self.env_id is None else c.get_init_cache(self.env_id, key, out)

    def set(self, key: int, kv: Any) -> None:
        c = self.collector
        if self.env_id is None:
            c.set_recur_cache(key, kv)
        else:
            c.set_init_cache(self.env_id, key, kv)

    def clear(self) -> None:
        c = self.collector
        if self.env_id is None:
            c.clear_recur_cache()
        else:
            c.clear_init_caches(self.env_id)


class _PoolMap:
    """Stands where a key -> slot dict was; backed by one of a collector's caches."""

    def __init__(self, route: _Route, staging: _Staging) -> None:
        self._route = route
        self._pool = route.pool
        self._staging = staging

    def get(self, key: Any, default: Any = None) -> Any:
        buf = self._staging.candidate(self._pool.entry_spec)
        entry = self._route.get(_key(key), buf)
        if entry is None:
            return default
        if buf is not None:
            self._staging.advance()
        return _Token(entry)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._route.set(_key(key), value.kv if isinstance(value, _Pending) else value)

    def __getitem__(self, key: Any) -> Any:
        token = self.get(key)
        if token is None:
            raise KeyError(key)
        return token

    def __contains__(self, key: object) -> bool:
        return _key(key) in self._pool

    def pop(self, key: Any, default: Any = None) -> Any:
        return key if self._pool.delete(_key(key)) else default

    def __delitem__(self, key: Any) -> None:
        if not self._pool.delete(_key(key)):
            raise KeyError(key)

    def clear(self) -> None:
        self._route.clear()

    def __len__(self) -> int:
        return len(self._pool)

    def __iter__(self) -> Iterator[int]:
        return iter(self._pool.keys())

    def keys(self) -> List[int]:
        return self._pool.keys()


class _TokenSlots:
    """Stands where a slot list was: indexing with a map's token gives the staged entry.

    LightZero 0.2.0 indexes the recur list with the dict's answer even on a miss
    (``shared_pool_recur_infer[None]``): a miss gives None here, so the world model takes its
    generate path and recomputes instead of raising."""

    def __getitem__(self, token: Any) -> Any:
        return None if token is None else token.entry

    def __len__(self) -> int:
        return 0


@dataclass
class ValidationStats:
    """Validate mode's tally: every lookup, and how many disagreed."""

    lookups: int = 0
    compared: int = 0  # both hit: tensors and sizes compared
    hit_mismatches: int = 0  # one hit, the other missed
    data_mismatches: int = 0  # both hit, different contents
    examples: List[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.hit_mismatches + self.data_mismatches

    def as_dict(self) -> Dict[str, int]:
        return {"lookups": self.lookups, "compared": self.compared, "hit_mismatches": self.hit_mismatches,
                "data_mismatches": self.data_mismatches, "mismatches": self.mismatches}


class _CheckedMap:
    """Validate mode: the original dict drives the model; our pool mirrors every write, and
    every lookup is answered by both and compared."""

    def __init__(self, original: Dict[Any, int], slots: List[Any], route: _Route, staging: _Staging,
                 adapter: "LightZeroCacheAdapter", name: str) -> None:
        self._orig, self._slots, self._route, self._pool, self._staging = original, slots, route, route.pool, staging
        self._adapter, self._name = adapter, name

    def get(self, key: Any, default: Any = None) -> Any:
        index = self._orig.get(key)
        buf = self._staging.candidate(self._pool.entry_spec)
        ours = self._route.get(_key(key), buf)
        self._adapter._compare(self._name, key, None if index is None else self._slots[index], ours)
        return default if index is None else index

    def __setitem__(self, key: Any, index: int) -> None:
        self._orig[key] = index
        self._route.set(_key(key), self._slots[index])  # the original helper just filled it

    def __getitem__(self, key: Any) -> int:
        return self._orig[key]

    def __contains__(self, key: object) -> bool:
        return key in self._orig

    def pop(self, key: Any, default: Any = None) -> Any:
        self._pool.delete(_key(key))
        return self._orig.pop(key, default)

    def clear(self) -> None:
        self._orig.clear()
        self._route.clear()

    def __len__(self) -> int:
        return len(self._orig)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._orig)

    def keys(self) -> Any:
        return self._orig.keys()


class LightZeroCacheAdapter:
    """The link between one world model and one manager; see the module docstring."""

    def __init__(self, world_model: Any, manager: KVCacheManager, on_mismatch: str = "raise",
                 compare: str = "equal", rtol: float = 1e-5, atol: float = 1e-8,
                 collector: Optional[CollectorCaches] = None) -> None:
        if on_mismatch not in ("raise", "log"):
            raise ConfigError(f"on_mismatch must be 'raise' or 'log', got {on_mismatch!r}")
        if compare not in ("equal", "allclose"):
            raise ConfigError(f"compare must be 'equal' or 'allclose', got {compare!r}")
        self.world_model = world_model
        self.manager = manager
        #: This world model's view of the manager: its root pools, its holds in the recur pool.
        self.collector = collector if collector is not None else manager.collector(
            0, len(world_model.past_kv_cache_init_infer_envs))
        self.on_mismatch = on_mismatch
        self.compare = compare
        self.rtol, self.atol = float(rtol), float(atol)
        self.validation = ValidationStats()
        self.mode = "original"
        self._original = {name: world_model.__dict__[name] for name in _REPLACED if name in world_model.__dict__}
        self._staging = _Staging(manager.wm_pool.capacity or manager.env_num)
        #: The batched seam in modes "new" and "switch_over" on a LightZero 0.2.0 world model.
        self.seam: Optional[Any] = None

    # -- modes ---------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        """Switch between ``"original"``, ``"new"``, ``"validate"`` and ``"switch_over"``.

        Every switch starts from empty caches (ours and the original's): entries written under
        one mode are not carried into another. Switch between searches, not inside one.
        """
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if self.mode == "switch_over" and mode != "switch_over":
            raise IntegrationError("after switch_over the original caches are released; re-create the world model")
        wm = self.world_model
        self._restore()
        self.seam = None
        wm.clear_caches() if hasattr(wm, "clear_caches") else None
        self.collector.clear_all()  # this world model's entries only: other collectors keep theirs
        if mode in ("new", "switch_over"):
            self._install_new()
            if mode == "switch_over":
                self._original = {}  # the legacy slot lists and dicts can now be freed
        elif mode == "validate":
            self._install_validation()
        self.mode = mode
        if hasattr(wm, "config"):
            try:
                wm.config.use_new_cache_manager = mode in ("new", "switch_over")
            except Exception:  # a read-only config object: the flag is informative only
                pass

    def _restore(self) -> None:
        from .lightzero_seam import BATCHED_SEAMS

        for name in _REPLACED:
            if name in self._original:
                setattr(self.world_model, name, self._original[name])
            else:  # a method we shadowed on the instance: let the class's show through again
                self.world_model.__dict__.pop(name, None)
        for name in BATCHED_SEAMS:
            self.world_model.__dict__.pop(name, None)

    def _install_new(self) -> None:
        wm, c, staging = self.world_model, self.collector, self._staging
        wm.custom_copy_kv_cache_to_shared_init_envs = lambda src_kv, env_id: _Pending(src_kv)
        wm.custom_copy_kv_cache_to_shared_recur = lambda src_kv: _Pending(src_kv)
        from . import lightzero_seam  # it builds on this module's maps

        if lightzero_seam.supports(wm):  # LightZero 0.2.0's WorldModel: the whole batch at once
            self.seam = lightzero_seam.BatchedSeam(wm, c)
            self.seam.install(staging)
            return
        wm.past_kv_cache_init_infer_envs = [_PoolMap(_Route(c, e), staging) for e in range(c.env_num)]
        wm.past_kv_cache_recurrent_infer = _PoolMap(_Route(c, None), staging)
        wm.shared_pool_init_infer = [_TokenSlots() for _ in range(c.env_num)]
        wm.shared_pool_recur_infer = _TokenSlots()
        wm.shared_pool_wm = _TokenSlots()
        wm.custom_copy_kv_cache_to_shared_wm = lambda src_kv: src_kv if staging.owns(src_kv) else staging.copy_in(src_kv)

    def _install_validation(self) -> None:
        wm, c, orig = self.world_model, self.collector, self._original
        wm.past_kv_cache_init_infer_envs = [
            _CheckedMap(d, orig["shared_pool_init_infer"][i], _Route(c, i), self._staging, self, f"init_env{i}")
            for i, d in enumerate(orig["past_kv_cache_init_infer_envs"])
        ]
        wm.past_kv_cache_recurrent_infer = _CheckedMap(
            orig["past_kv_cache_recurrent_infer"], orig["shared_pool_recur_infer"], _Route(c, None), self._staging,
            self, "recurrent")

    def detach(self) -> None:
        """Give the world model its own caches back (not possible after ``switch_over``)."""
        self.set_mode("original")

    def close(self) -> None:
        """Give the world model its own caches back where possible and release this world
        model's entries and claims in the manager (its root pools, its holds)."""
        if self.mode != "switch_over":
            self.set_mode("original")
        self.collector.close()

    # -- validation ----------------------------------------------------------------------

    def _same(self, a: Any, b: Any) -> bool:
        """Whether two entries give the model the same tokens.

        Only each cache's first ``_size`` tokens are compared: the model never reads past them,
        and LightZero allocates its slots with ``torch.empty``, so the tail holds whatever the
        memory held, NaN included (NaN != NaN would fail a faithful copy). For the same reason
        ``"equal"`` compares bits and ``"allclose"`` counts NaN equal to NaN.
        """
        ta, sa = entry_tensors(a)
        tb, sb = entry_tensors(b)
        if sa != sb or len(ta) != len(tb):
            return False
        for x, y, size in zip(ta, tb, sa):
            x, y = x[..., :size, :], y[..., :size, :]
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if self.compare == "equal":
                if not torch.equal(_bits(x), _bits(y)):
                    return False
            elif not torch.allclose(x, y, rtol=self.rtol, atol=self.atol, equal_nan=True):
                return False
        return True

    def _compare(self, pool: str, key: Any, original: Any, ours: Any) -> None:
        v = self.validation
        v.lookups += 1
        if (original is None) != (ours is None):
            v.hit_mismatches += 1
            what = f"{pool} key {key!r}: original {'hit' if original is not None else 'miss'}, ours " \
                   f"{'hit' if ours is not None else 'miss'}"
        elif original is None:
            return
        else:
            v.compared += 1
            if self._same(original, ours):
                return
            v.data_mismatches += 1
            what = f"{pool} key {key!r}: retrieved entries differ"
        if len(v.examples) < 20:
            v.examples.append(what)
        if self.on_mismatch == "raise":
            raise ValidationMismatchError(what)
        log.warning("concurrent_kv validation mismatch: %s", what)

    # -- statistics ----------------------------------------------------------------------

    def stats_summary(self) -> Dict[str, Any]:
        """The manager's summary, plus the validation tally and the mode."""
        summary = self.manager.get_stats_summary()
        summary["collector"] = self.collector.stats()  # refused stores (recomputed), foreign hits
        summary["mode"] = self.mode
        summary["validation"] = self.validation.as_dict()
        return summary

    def flat_stats(self, prefix: str = "kv_cache") -> Dict[str, float]:
        """Flat scalars for ``SummaryWriter.add_scalar``: pool counters and validation tally."""
        out = self.manager.flat_stats(prefix)
        out.update({f"{prefix}/validation/{k}": v for k, v in self.validation.as_dict().items()})
        return out


def _check_seams(world_model: Any) -> None:
    missing = [name for name in SEAMS if not hasattr(world_model, name)]
    if missing:
        raise IntegrationError(
            f"{type(world_model).__name__} lacks the cache seams {missing} (LightZero {_lightzero_version()}); "
            "concurrent_kv attaches to UniZero world models with LightZero's legacy KV cache (0.2.0)"
        )
    if hasattr(world_model, "pool_idx_to_key_map_recur_infer"):
        # Later versions index reverse maps by the copy helpers' int results, which the maps
        # here replace with tokens: that layout needs its own seam.
        raise IntegrationError(
            f"this world model (LightZero {_lightzero_version()}) keeps reverse slot maps "
            "(pool_idx_to_key_map_*), which this adapter does not handle yet; supported: LightZero 0.2.0"
        )


def _env_count(world_model: Any) -> int:
    """How many environments a world model keeps root caches for (its config's ``env_num``)."""
    return len(world_model.past_kv_cache_init_infer_envs)


def _new_manager(world_models: List[Any], shared: bool, first_env: int = 0) -> KVCacheManager:
    """A manager sized like these world models' own pools together: one init pool per env of
    each (after ``first_env`` unused ones), a recur and a wm pool as large as all of theirs."""
    first = world_models[0]
    config = getattr(first, "config", None)
    device = torch.device(getattr(config, "device", "cpu") or "cpu")
    # Shared pools live in host memory: a CUDA model's pools are shaped by its first entry.
    spec = EntrySpec.for_transformer(config) if config is not None and device.type == "cpu" else None
    sizes = {
        "init_pool_size": len(first.shared_pool_init_infer[0]),
        "recur_pool_size": sum(len(wm.shared_pool_recur_infer) for wm in world_models),
        "wm_pool_size": sum(len(wm.shared_pool_wm) for wm in world_models),
    }
    return KVCacheManager(sizes, first_env + sum(_env_count(wm) for wm in world_models),
                          shared=shared, entry_spec=spec)


def _check_mode(mode: Optional[str]) -> None:
    if mode is not None and mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES} or None, got {mode!r}")


def _attach_one(world_model: Any, manager: KVCacheManager, mode: Optional[str], first_env: int,
                **compare: Any) -> LightZeroCacheAdapter:
    """Make ``world_model`` the collector of envs ``first_env..`` of ``manager``; on any failure
    undo what was done (the collector's claims), so a caller's manager is left as it was."""
    envs = _env_count(world_model)
    if manager.env_num < first_env + envs:
        raise ConfigError(
            f"manager has {manager.env_num} init pools; the world model's {envs} environments from "
            f"first_env={first_env} do not fit"
        )
    if mode is None:
        config = getattr(world_model, "config", None)
        mode = "new" if bool(getattr(config, "use_new_cache_manager", False)) else "original"
    collector = manager.collector(first_env, envs)
    adapter: Optional[LightZeroCacheAdapter] = None
    try:
        adapter = LightZeroCacheAdapter(world_model, manager, collector=collector, **compare)
        if mode != "original":
            adapter.set_mode(mode)
        return adapter
    except BaseException:
        adapter.close() if adapter is not None else collector.close()
        raise


def attach(
    world_model: Any,
    manager: Optional[KVCacheManager] = None,
    *,
    mode: Optional[str] = None,
    shared: bool = False,
    on_mismatch: str = "raise",
    compare: str = "equal",
    rtol: float = 1e-5,
    atol: float = 1e-8,
    first_env: int = 0,
) -> LightZeroCacheAdapter:
    """Attach a manager to a live UniZero ``world_model``; return the adapter.

    ``manager`` defaults to a new one sized like the world model's own pools (``shared=True``
    puts it in shared memory). ``mode`` defaults to ``"new"`` when the world model's config has
    ``use_new_cache_manager=True``, else ``"original"`` (LightZero's default). The world model is
    one collector of the manager (see :meth:`KVCacheManager.collector`): its envs are the
    manager's init pools ``first_env, first_env+1, ...``; give each world model sharing a manager
    its own range.
    """
    _check_seams(world_model)
    _check_mode(mode)
    non_negative_int("first_env", first_env)
    boolean("shared", shared)
    owned = manager is None
    target = _new_manager([world_model], shared, first_env) if manager is None else \
        instance_of("manager", manager, KVCacheManager)
    try:
        return _attach_one(world_model, target, mode, first_env, on_mismatch=on_mismatch, compare=compare,
                           rtol=rtol, atol=atol)
    except BaseException:
        if owned:  # never leave a manager (shared-memory segments) nobody holds
            target.close()
        raise


def _policy_world_models(policy: Any) -> List[Any]:
    """The world models a UniZero policy searches with, each once: the collect model's, then the
    eval model's where it is another object. With LightZero's usual ``enable_field`` (learn,
    collect, eval) both are ``policy._model``, so this is one world model. The target model's
    (``policy._target_model``) is a learner-side deep copy for reanalysis and is left alone."""
    if policy is None or isinstance(policy, type):
        raise IntegrationError(f"enable needs a UniZero policy instance, got {policy!r}")
    found: List[Any] = []
    for name in ("_collect_model", "_eval_model"):
        world_model = getattr(getattr(policy, name, None), "world_model", None)
        if world_model is not None and all(world_model is not w for w in found):
            found.append(world_model)
    if not found:
        raise IntegrationError(
            f"{type(policy).__name__} is not a UniZero policy with a collect or eval model: no "
            "_collect_model.world_model or _eval_model.world_model (pass the policy object itself, created "
            "with 'collect' or 'eval' in enable_field, not policy.collect_mode)"
        )
    for world_model in found:
        _check_seams(world_model)
    return found


def enable(
    policy: Any,
    manager: Optional[KVCacheManager] = None,
    *,
    handle: Optional[ManagerHandle] = None,
    first_env: int = 0,
    mode: Optional[str] = "new",
    shared: bool = False,
) -> List[LightZeroCacheAdapter]:
    """Route a UniZero policy's KV caches through one manager, in one call; return the adapters
    (one per distinct world model: the collect model's, then the eval model's if it is another).

    The manager is ``manager``, or the shared one behind ``handle`` (a worker process given
    :meth:`KVCacheManager.handle` by its launcher), or else a new one sized like the policy's own
    pools (``shared=True`` puts it in shared memory). Each world model takes the next range of
    the manager's init pools from ``first_env``: a worker process ``i`` of a launcher running
    ``E`` envs per collector passes ``first_env=i * E``. Close every adapter when done; a manager
    that ``enable`` created or attached (``adapters[0].manager``) is the caller's to close too.
    """
    world_models = _policy_world_models(policy)
    _check_mode(mode)
    non_negative_int("first_env", first_env)
    boolean("shared", shared)
    if manager is not None and handle is not None:
        raise ConfigError("give enable() a manager or a handle, not both")
    if manager is not None:
        instance_of("manager", manager, KVCacheManager)
        if shared and not manager.shared:
            raise ConfigError("shared=True, but the manager given is not in shared memory")
    owned = manager is None
    if handle is not None:
        manager = KVCacheManager.attach(handle)
    elif manager is None:
        manager = _new_manager(world_models, shared, first_env)
    adapters: List[LightZeroCacheAdapter] = []
    try:
        for world_model in world_models:
            adapters.append(_attach_one(world_model, manager, mode, first_env))
            first_env += _env_count(world_model)
    except BaseException:
        for adapter in adapters:
            adapter.close()
        if owned:
            manager.close()
        raise
    return adapters
