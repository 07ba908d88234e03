"""Static sparsity: a random or magnitude mask drawn once at the target density, never changed."""

from dist_sparse.algorithms.base import MethodRule

RULE = MethodRule(name="static", kind="fixed", starts_dense=False)
