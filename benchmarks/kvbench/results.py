"""The results dictionary (``results[section][table] = rows``) and finding rows in it."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

Row = Dict[str, Any]
Rows = List[Row]
Results = Dict[str, Any]


def find(rows: Sequence[Row], **match: Any) -> Optional[Row]:
    """The first row whose fields equal ``match``, or None."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def value(row: Optional[Row], key: str) -> Optional[float]:
    return None if row is None else row.get(key)


def table(results: Results, section: str, name: str) -> Rows:
    """``results[section][name]``, or no rows when that section did not run."""
    return results.get(section, {}).get(name, [])
