"""docs/usage.md and README.md: every ```python block runs, so the docs cannot silently rot.

Each block is compiled with its markdown file as the file name and padded to its real line
number, so a failure's traceback points at the line in the .md file. Blocks run in a fresh
namespace in this process (importing torch once keeps the whole file well under 15 s); each
block must therefore be self-contained, as it would be in a fresh interpreter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

import pytest

from concurrent_kv import eviction

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "docs" / "usage.md", ROOT / "README.md"]

# An opening fence of exactly ```python at the start of a line, up to the next closing fence.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> List[Tuple[str, int, str]]:
    """``(id, first line number, source)`` for each python block of ``path``, numbered from 1."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for n, match in enumerate(_BLOCK.finditer(text), start=1):
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((f"{path.name}:block{n}", first_line, match.group(1)))
    return blocks


BLOCKS = [(path, *block) for path in DOC_FILES for block in python_blocks(path)]


def test_every_doc_file_has_python_blocks() -> None:
    for path in DOC_FILES:
        assert python_blocks(path), f"no ```python block found in {path} (fence renamed?)"


@pytest.mark.parametrize(
    ("path", "block_id", "first_line", "source"),
    BLOCKS,
    ids=[block_id for _, block_id, _, _ in BLOCKS],
)
def test_doc_block_runs(path: Path, block_id: str, first_line: int, source: str) -> None:
    code = compile("\n" * (first_line - 1) + source, str(path.relative_to(ROOT)), "exec")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    registered = dict(eviction._POLICIES)  # an example may register a policy: keep others unaffected
    try:
        exec(code, namespace)
    finally:
        eviction._POLICIES.clear()
        eviction._POLICIES.update(registered)
