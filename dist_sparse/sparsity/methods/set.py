"""SET (Mocanu et al. 2018) and Graphcore's variant (arXiv 2108.06277; ``method: "set"`` with
``pattern: "block"``): every update interval drop the smallest-magnitude active weights and
regrow the same number at random, unstructured or in blocks. The random scores are a
counter-based hash of (seed, step, parameter, global index) (``masks.topk.random_scores_at``),
computed on the device for this rank's elements only: every rank and device draws the same ones."""

from dist_sparse.schedules import drop_fraction
from dist_sparse.sparsity.methods.base import Method, log


class Set(Method):
    name = "set"

    def check(self, max_steps: int) -> None:
        super().check(max_steps)
        if self.cfg.update_interval >= self.end_step:
            log.warning("sparsity.update_interval %d >= the last update step %d: masks will never change",
                        self.cfg.update_interval, self.end_step)

    def regrow_fraction(self, step: int) -> float:
        return drop_fraction(step, self.cfg.drop_fraction, self.cfg.drop_schedule, self.end_step)

    def grow_scores(self, decision):
        return decision.random()
