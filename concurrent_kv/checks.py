"""Argument checks shared by every public entry point: one wording, one typed error each."""

from __future__ import annotations

import math
from typing import Any, Type, TypeVar

from .errors import ConfigError, ConcurrentKVError

__all__ = ["positive_int", "non_negative_int", "positive_seconds", "boolean", "instance_of"]

T = TypeVar("T")


def positive_int(name: str, value: Any, error: Type[ConcurrentKVError] = ConfigError) -> int:
    """``value`` if it is an int > 0 (a bool is not an int here), else ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise error(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value: Any, error: Type[ConcurrentKVError] = ConfigError) -> int:
    """``value`` if it is an int >= 0 (a bool is not an int here), else ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{name} must be a non-negative int, got {value!r}")
    return value


def positive_seconds(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a bool (not merely truthy), else :class:`ConfigError`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {value!r}")
    return value


def instance_of(name: str, value: Any, cls: Type[T]) -> T:
    """``value`` if it is a ``cls``, else :class:`ConfigError` naming the type received."""
    if not isinstance(value, cls):
        raise ConfigError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value
