"""Keeps integrations/lightzero_head.py in step with LightZero's main branch, by reading its source.

Every use LightZero's code (``lzero/``, tests aside) makes of ``kv_cache_manager`` is collected
from the syntax tree: attributes of the manager, of its pools (``init_pools[i].x``,
``recur_pool.x``, ``wm_pool.x``), keys read from ``get_stats_summary()``, the constructor's
arguments and the names imported from ``kv_cache_manager``. A new use, or one that went away,
fails here until ``MAIN_BRANCH_SURFACE`` (and, if needed, the code) follows; each listed use must
exist on ours. The main branch's class must pass the check ``use_for_main_branch`` makes.
"""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path
from typing import Dict, List, Set, Tuple

from .source import require_main_branch

SRC = require_main_branch()

import concurrent_kv  # noqa: E402
from concurrent_kv.integrations.lightzero_head import (  # noqa: E402
    CONSTRUCTOR,
    MAIN_BRANCH_SURFACE,
    MANAGER_METHODS,
    check_main_branch_manager,
)

POOLS = ("init_pools", "recur_pool", "wm_pool")


def lzero_files() -> List[Path]:
    return sorted(p for p in (SRC / "lzero").rglob("*.py") if "tests" not in p.parts)


def _is_manager(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "kv_cache_manager"


def _is_pool(node: ast.AST) -> bool:
    """``<...>.kv_cache_manager.init_pools[i]``, ``.recur_pool`` or ``.wm_pool``."""
    if isinstance(node, ast.Subscript):
        node = node.value
        return isinstance(node, ast.Attribute) and node.attr == "init_pools" and _is_manager(node.value)
    return isinstance(node, ast.Attribute) and node.attr in ("recur_pool", "wm_pool") and _is_manager(node.value)


def scan() -> Tuple[Dict[str, Set[str]], List[str]]:
    """(uses by kind, places the scan cannot follow: the manager or a pool bound to a name)."""
    uses: Dict[str, Set[str]] = {"manager": set(), "pool": set(), "summary": set(), "constructor": set(),
                                 "imported": set()}
    unfollowed: List[str] = []
    for path in lzero_files():
        scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)), uses, unfollowed)
    return uses, unfollowed


def scan_source(text: str, where: str, uses: Dict[str, Set[str]], unfollowed: List[str]) -> None:
    try:
        with warnings.catch_warnings():  # lzero's own invalid escape sequences are not ours to report
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(text)
    except SyntaxError:  # a few stale files in lzero/ do not parse; none may mention the manager
        if "kv_cache_manager" in text or "KVCacheManager" in text:
            unfollowed.append(f"{where} does not parse")
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_manager(node.value):
            uses["manager"].add(node.attr)
        if isinstance(node, ast.Attribute) and _is_pool(node.value):
            uses["pool"].add(node.attr)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value, name = node.value, node.targets[0].id
            if _is_manager(value) or _is_pool(value) or (isinstance(value, ast.Attribute) and value.attr in POOLS
                                                        and _is_manager(value.value)):
                unfollowed.append(f"{where}:{node.lineno} binds {ast.unparse(value)} to {name}")
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            fname = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if fname == "KVCacheManager":
                uses["constructor"].update(k.arg or "**" for k in node.keywords)
                uses["constructor"].update(f"#{i}" for i in range(len(node.args)))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("kv_cache_manager"):
            uses["imported"].update(a.name for a in node.names)
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            uses["summary"] |= _summary_keys(func)


def _summary_keys(func: ast.AST) -> Set[str]:
    """Keys one function reads from a summary it got: ``s = <...>.kv_cache_manager.get_stats_summary()``,
    then ``s.get('k')`` or ``s['k']``."""
    names = {node.targets[0].id for node in ast.walk(func)
             if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
             and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
             and node.value.func.attr == "get_stats_summary" and _is_manager(node.value.func.value)}
    keys: Set[str] = set()
    for node in ast.walk(func):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in names and node.args
                and isinstance(node.args[0], ast.Constant)):
            keys.add(node.args[0].value)
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names
                and isinstance(node.slice, ast.Constant)):
            keys.add(node.slice.value)
    return keys


USES, UNFOLLOWED = scan()


def test_the_scan_finds_what_the_world_model_is_known_to_use() -> None:
    assert {"hierarchical_get", "init_pools", "clear_recur_cache"} <= USES["manager"]
    assert "_key_to_index" in USES["pool"]


def test_the_scan_sees_a_new_use() -> None:
    """What a future main branch could add is caught: a new manager method, a pool attribute, a
    summary key, a constructor argument, an alias the scan cannot follow, another imported name."""
    uses: Dict[str, Set[str]] = {k: set() for k in USES}
    unfollowed: List[str] = []
    scan_source(
        "from .kv_cache_manager import KVCacheManager, EvictionStrategy\n"
        "def f(self):\n"
        "    self.kv_cache_manager = KVCacheManager(config=c, env_num=2, device='cuda')\n"
        "    self.kv_cache_manager.resize(10)\n"
        "    self.kv_cache_manager.init_pools[0]._index_to_key\n"
        "    s = self.kv_cache_manager.get_stats_summary()\n"
        "    s['recur_pool']\n"
        "    m = self.kv_cache_manager\n", "x.py", uses, unfollowed)
    assert uses["manager"] == {"resize", "init_pools", "get_stats_summary"}
    assert uses["pool"] == {"_index_to_key"} and uses["summary"] == {"recur_pool"}
    assert uses["constructor"] == {"config", "env_num", "device"}
    assert uses["imported"] == {"KVCacheManager", "EvictionStrategy"}
    assert len(unfollowed) == 1


def test_every_use_is_listed_and_nothing_more() -> None:
    for kind in ("manager", "pool", "summary"):
        assert USES[kind] == set(MAIN_BRANCH_SURFACE[kind]), kind
    assert UNFOLLOWED == []


def test_the_constructor_call_and_imports_are_the_known_ones() -> None:
    assert USES["constructor"] <= set(CONSTRUCTOR), "world_model.py passes an argument ours does not take"
    assert USES["imported"] == {"KVCacheManager"}, "code imports more than the class use_for_main_branch replaces"


def test_ours_offers_every_use() -> None:
    params = tuple(inspect.signature(concurrent_kv.KVCacheManager.__init__).parameters)[1:]
    assert params[: len(CONSTRUCTOR)] == CONSTRUCTOR
    m = concurrent_kv.KVCacheManager({"num_simulations": 2}, env_num=2, enable_stats=True,
                                     clear_recur_log_freq=1000, clear_all_log_freq=100)
    for name in MAIN_BRANCH_SURFACE["manager"] + MANAGER_METHODS:
        assert hasattr(m, name), name
    for pool in m.pools():
        for name in MAIN_BRANCH_SURFACE["pool"]:
            assert hasattr(pool, name), name
    for key in MAIN_BRANCH_SURFACE["summary"]:
        assert key in m.get_stats_summary()


def test_the_main_branch_class_is_the_one_we_replace() -> None:
    from lzero.model.unizero_world_models import kv_cache_manager as lz_kvm

    check_main_branch_manager(lz_kvm.KVCacheManager)
