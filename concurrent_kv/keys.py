"""Cache keys: validation and LightZero's state hash."""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

from .errors import InvalidKeyError

__all__ = ["hash_state", "check_key", "KEY_MAX"]

#: Keys are xxh64 digests, so they live in [0, 2**64); the bound lets a key fit a uint64 slot.
KEY_MAX = (1 << 64) - 1


def hash_state(latent: Any) -> int:
    """Return LightZero's cache key for one latent state.

    The key is ``xxh64`` of the state's float32 bytes, as a Python ``int``; this equals
    ``lzero.model.unizero_world_models.utils.hash_state`` (``intdigest`` form). Torch tensors go
    through ``detach().cpu()`` and ``.view(-1)``, numpy arrays are used as they are.
    """
    if hasattr(latent, "detach") and hasattr(latent, "cpu"):
        if str(latent.dtype) != "torch.float32":
            raise InvalidKeyError(f"hash_state expects float32 data (LightZero's latents), got {latent.dtype}")
        latent = latent.detach().reshape(-1).cpu().numpy()
    elif not isinstance(latent, np.ndarray):
        raise InvalidKeyError(f"hash_state expects a torch.Tensor or numpy.ndarray, got {type(latent).__name__}")
    if latent.dtype != np.float32:
        raise InvalidKeyError(f"hash_state expects float32 data (LightZero's latents), got dtype {latent.dtype}")
    return xxhash.xxh64(np.ascontiguousarray(latent).tobytes()).intdigest()


def check_key(key: Any) -> int:
    """Return ``key`` as a plain int, or raise :class:`InvalidKeyError`.

    ``bool`` is refused (``True`` is an int to Python but never a meaningful cache key); numpy
    integers are accepted because LightZero computes keys with numpy.
    """
    if type(key) is int:  # the hot path: one type check, one range check
        if 0 <= key <= KEY_MAX:
            return key
    elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        key = int(key)
        if 0 <= key <= KEY_MAX:
            return key
    else:
        raise InvalidKeyError(f"cache key must be an int in [0, 2**64), got {type(key).__name__}: {key!r}")
    raise InvalidKeyError(f"cache key must be an int in [0, 2**64), got {key}")
