"""RigL (Evci et al. 2020): drop by magnitude, regrow where the dense gradient is largest.

Not wired into the sparsifier yet: the dense gradient of pruned weights must be taken before the
gradient hook zeroes it and reduced over data-parallel ranks on update steps only."""

from dist_sparse.algorithms.base import MethodRule

RULE = MethodRule(name="rigl", kind="regrow", starts_dense=False, grow="gradient", available=False,
                  note="gradient regrowth under ZeRO is the next milestone")
