"""Gradual magnitude pruning (Zhu & Gupta 2017): dense at the start, then every update interval
the smallest-magnitude active weights are removed until the cubic schedule reaches the target."""

from dist_sparse.algorithms.base import MethodRule

RULE = MethodRule(name="gmp", kind="gmp", starts_dense=True)
