"""docs/integration.md's main-branch example runs as written, from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .source import REPO, require_main_branch

SRC = require_main_branch()


def example(marker: str) -> str:
    text = (REPO / "docs" / "integration.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {re.escape(marker)}.*?-->\n```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert match, f"no example marked {marker} in docs/integration.md"
    return match.group(1)


def test_the_main_branch_example_runs() -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC))  # where $LIGHTZERO_SRC, not ../shared, holds the source
    done = subprocess.run([sys.executable, "-c", example("lightzero-main")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].endswith("kv_cache_manager.KVCacheManager -> KVCacheManager in "
                             "lzero.model.unizero_world_models.kv_cache_manager")
    assert "<class 'concurrent_kv.manager.KVCacheManager'>" in lines
    assert lines[-1].startswith("CacheStats(hits=")
