"""Sparse-training methods as score rules over the shared mask-update routine.

Every method is the same loop (``dist_sparse.sparsifier``): score, pick with a deterministic
top-k, install. What differs is small and lives here, one module per method: when masks change
(``kind``), whether training starts dense, and what regrowth is scored by.
"""

from __future__ import annotations

from dist_sparse.algorithms.base import MethodRule
from dist_sparse.algorithms import gmp, rigl, set_method, static

RULES: dict[str, MethodRule] = {r.name: r for r in (static.RULE, gmp.RULE, set_method.RULE, rigl.RULE)}


def get(name: str) -> MethodRule:
    if name not in RULES:
        raise ValueError(f"unknown sparsity method {name!r}; known: {sorted(RULES)}")
    rule = RULES[name]
    if not rule.available:
        raise ValueError(f"sparsity method {name!r} is not available in this version of dist_sparse "
                         f"({rule.note}); use one of {sorted(n for n, r in RULES.items() if r.available)}")
    return rule
