"""Sparse-training methods, one module each (see ``base``); the registry by config name."""

from __future__ import annotations

from dist_sparse.sparsity.methods.base import Goal, Method
from dist_sparse.sparsity.methods.gmp import Gmp
from dist_sparse.sparsity.methods.rigl import RigL
from dist_sparse.sparsity.methods.set import Set
from dist_sparse.sparsity.methods.static import Static

METHODS: dict[str, type[Method]] = {m.name: m for m in (Static, Gmp, Set, RigL)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown sparsity method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["Goal", "METHODS", "Method", "method_class"]
