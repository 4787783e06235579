"""Parsing and validating a manager's configuration.

``ManagerConfig.from_any`` accepts a dict, a dataclass, an attribute object (LightZero's
``EasyDict`` world-model config) or a ``ManagerConfig``. Fields it does not know are ignored, since
a world-model config carries many; fields it knows are validated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Union

import torch

from .checks import positive_int, positive_seconds
from .entry import EntrySpec
from .errors import ConfigError
from .eviction import EvictionStrategy, resolve_policy
from .locks import LOCK_KINDS

__all__ = ["ManagerConfig"]

_SIZE_FIELDS = ("num_simulations", "max_cache_size", "init_pool_size", "recur_pool_size", "wm_pool_size")
_SHAPE_FIELDS = ("num_layers", "num_heads", "embed_dim", "context_length")


@dataclass(frozen=True)
class ManagerConfig:
    """Sizes default to LightZero's rules: init ``min(max_cache_size, max(256, 2*num_simulations))``,
    recur ``num_simulations * env_num``, wm ``env_num``."""

    num_simulations: int = 50
    max_cache_size: int = 5000
    init_pool_size: Optional[int] = None
    recur_pool_size: Optional[int] = None
    wm_pool_size: Optional[int] = None
    init_eviction_strategy: Union[EvictionStrategy, str] = EvictionStrategy.FIFO
    recur_eviction_strategy: Union[EvictionStrategy, str] = EvictionStrategy.FIFO
    wm_eviction_strategy: Union[EvictionStrategy, str] = EvictionStrategy.FIFO
    lock: str = "rw"
    lock_timeout: float = 30.0
    # The entry shape, needed up front by shared pools; LightZero's world-model config has these.
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    embed_dim: Optional[int] = None
    context_length: Optional[int] = None
    max_workers: int = 64
    # Where a local pool's slots live when shaped from the config (LightZero's world-model config
    # has ``device``: "cpu", "cuda", "cuda:0"); None means cpu. Shared pools are host memory.
    device: Optional[Any] = None

    def __post_init__(self) -> None:
        for name in _SIZE_FIELDS + _SHAPE_FIELDS + ("max_workers",):
            value = getattr(self, name)
            if value is None and (name.endswith("_pool_size") or name in _SHAPE_FIELDS):
                continue
            positive_int(f"config.{name}", value)
        for name in ("init_eviction_strategy", "recur_eviction_strategy", "wm_eviction_strategy"):
            resolve_policy(getattr(self, name))  # raises ConfigError on an unknown name
        if self.num_heads and self.embed_dim and self.embed_dim % self.num_heads:
            raise ConfigError(f"config.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.lock not in LOCK_KINDS:
            raise ConfigError(f"config.lock must be one of {LOCK_KINDS}, got {self.lock!r}")
        positive_seconds("config.lock_timeout", self.lock_timeout)
        if self.device is not None:
            if isinstance(self.device, bool) or not isinstance(self.device, (str, int, torch.device)):
                raise ConfigError(f"config.device must be a torch device, str or int, got {self.device!r}")
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ConfigError(f"config.device must name a torch device, got {self.device!r}: {exc}") from None

    @classmethod
    def from_any(cls, config: Any) -> "ManagerConfig":
        """Build from a dict, dataclass, attribute object, ``ManagerConfig`` or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, ManagerConfig):
            return config
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            source: Dict[str, Any] = {f.name: getattr(config, f.name) for f in fields(config)}
        elif isinstance(config, dict):
            source = dict(config)
        elif hasattr(config, "__dict__") or hasattr(config, "__getattr__"):
            source = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        else:
            raise ConfigError(f"config must be a dict, dataclass or attribute object, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in source.items() if k in known}
        return cls(**kwargs)

    def entry_spec(self) -> Optional[EntrySpec]:
        """UniZero's entry shape from the config (n=1, float32, on ``device``, default cpu), if all
        four shape fields are set."""
        return EntrySpec.for_transformer(self, self.device if self.device is not None else "cpu")

    def init_size(self) -> int:
        if self.init_pool_size is not None:
            return self.init_pool_size
        return min(self.max_cache_size, max(256, 2 * self.num_simulations))

    def recur_size(self, env_num: int) -> int:
        return self.recur_pool_size if self.recur_pool_size is not None else self.num_simulations * env_num

    def wm_size(self, env_num: int) -> int:
        return self.wm_pool_size if self.wm_pool_size is not None else env_num

