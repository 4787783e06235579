"""Where the tier finds LightZero's main-branch source, and the skip when it is absent.

``$LIGHTZERO_SRC`` names a checkout (a folder holding ``lzero/``); else the repository's sibling
``../shared/lightzero-head`` (the copy the project keeps, see its SOURCE.md). The main branch
cannot be installed from PyPI (its newest release is 0.2.0), so its folder goes first on
``sys.path``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO.parent / "shared" / "lightzero-head"
MANAGER_FILE = Path("lzero", "model", "unizero_world_models", "kv_cache_manager.py")


def find_source() -> Optional[Path]:
    """The main-branch checkout to test against, or None."""
    named = os.environ.get("LIGHTZERO_SRC")
    candidate = Path(named).expanduser().resolve() if named else DEFAULT
    return candidate if (candidate / MANAGER_FILE).is_file() else None


def require_main_branch() -> Path:
    """Put the main-branch source first on ``sys.path``; skip the calling module when it is absent."""
    src = find_source()
    if src is None:
        where = os.environ.get("LIGHTZERO_SRC") or str(DEFAULT)
        pytest.skip(
            f"LightZero main-branch source not found at {where} (no {MANAGER_FILE}): set LIGHTZERO_SRC to a "
            "LightZero checkout, or provide ../shared/lightzero-head beside the repository",
            allow_module_level=True,
        )
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import lzero

    if not Path(lzero.__file__).resolve().is_relative_to(src):
        raise RuntimeError(f"lzero was imported from {lzero.__file__}, not from the main-branch source {src}")
    return src
