"""Every label a row is looked up by, in one place.

Rows carry these strings (they are what results.json and results.md show); summaries, goals and
plots find rows by the same constants, so renaming a label renames it everywhere at once instead
of silently turning a goal into ``n/a``.
"""

from __future__ import annotations


class Op:
    """Pool operations (micro, memory, in-process baselines)."""

    COPY = "copy_"
    COPY_PARTS = "copy_ (a tensor per cache)"  # the floor of entries in LightZero's layout
    CLONE = "clone"
    GET_NEW = "get (new entry)"
    GET_NEW_CONTROL = "get (new entry) [control]"
    GET_OUT = "get (out=)"
    MISS = "get miss"
    LEASE = "lease hit"
    SET = "set (rewrite)"
    HIERARCHICAL = "hierarchical_get (out=)"
    SET_EVICTING = "set (new key, evicting)"
    GET_OUT_FOREIGN = "get (out=, LightZero layout)"
    SET_FOREIGN = "set (rewrite, LightZero layout)"
    FOREIGN = (GET_OUT_FOREIGN, SET_FOREIGN)  # measured against COPY_PARTS
    LEGACY_GET = "get + copy to staging"
    LEGACY_SET = "set (ring write)"
    CLONE_GET = "get (clone)"
    PLAIN_GET = "get"
    PLAIN_SET = "set"
    SEND_RECEIVE = "send+receive (per item)"
    PUT_GET = "put + get"


class Impl:
    """Baseline implementations."""

    LEGACY = "legacy ring"
    DICT_LOCK = "dict + Lock (clones)"
    CACHETOOLS = "cachetools.LRUCache + lock"
    MANAGER_DICT = "Manager().dict()"
    TORCH_QUEUE = "torch.mp.Queue"
    RAY = "ray"

    ALL = (LEGACY, DICT_LOCK, CACHETOOLS, MANAGER_DICT, TORCH_QUEUE, RAY)


class Variant:
    """Who ran a trace."""

    OURS = "ours"
    SHARED = "ours (shared)"
    LEGACY = "legacy model"


class Checks:
    """Whether a trace run filled and verified payloads."""

    CACHE_ONLY = "cache only"
    FILL_VERIFY = "fill+verify"

    BOTH = (CACHE_ONLY, FILL_VERIFY)


class Comparison:
    """Trace ratios."""

    ONE_THREAD = "ours 1 thread time / legacy 1 thread time"
    TWO_THREADS = "ours 2 threads throughput / legacy 1 thread throughput"
    PROCESSES = "2 processes x 1 thread / 1 process x 1 thread throughput"


class Prio:
    """The priority functions the hit-rate section replays (columns of its rows)."""

    DEPTH = "priority (-depth)"
    SEARCH_DEPTH = "priority (search, -depth)"
