"""docs/integration.md's LightZero 0.2.0 example runs as written, from the repository root."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_0_2_0_example_runs() -> None:
    text = (REPO / "docs" / "integration.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- example: lightzero-0\.2\.0.*?-->\n```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert match, "no example marked lightzero-0.2.0 in docs/integration.md"
    done = subprocess.run([sys.executable, "-c", match.group(1)], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("{'hits': ")
