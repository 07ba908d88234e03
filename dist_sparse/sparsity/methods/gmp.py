"""Gradual magnitude pruning (Zhu & Gupta 2017): dense at the start, then every update interval
the smallest-magnitude active weights are removed until the cubic schedule reaches the target."""

from dist_sparse.schedules import gmp_sparsity, is_update_step
from dist_sparse.sparsity.methods.base import Goal, Method


class Gmp(Method):
    name = "gmp"
    starts_dense = True

    def is_update_step(self, step: int) -> bool:
        # Prunes at grid steps from start_step through end_step, and at end_step itself so that
        # the target is reached even when the grid does not land on it.
        return step == self.end_step or is_update_step(step, self.cfg.update_interval, self.end_step + 1,
                                                       max(0, self.start_step - 1))

    def goal(self, step: int) -> Goal:
        s_t = gmp_sparsity(step, self.cfg.sparsity, self.start_step, self.end_step, self.cfg.update_interval)
        # The share of each weight's final pruning reached at this step (ERK weights prune at their own rates).
        frac = s_t / self.cfg.sparsity if self.cfg.sparsity > 0 else 0.0
        return Goal({name: 1.0 - (1.0 - d) * frac for name, d in self.final_density.items()}, s_t)
