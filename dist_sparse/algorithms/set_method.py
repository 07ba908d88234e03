"""SET (Mocanu et al. 2018) and Graphcore's variant (arXiv 2108.06277): every update interval drop
the smallest-magnitude active weights and regrow the same number at random, unstructured or in
blocks. The random scores come from a generator keyed by (seed, step, parameter), so every rank
draws the same ones."""

from dist_sparse.algorithms.base import MethodRule

RULE = MethodRule(name="set", kind="regrow", starts_dense=False, grow="random")
