"""What a sparse-training method is: score rules over the one shared mask update.

In the style of google-research/rigl's mask updaters: the update itself (score, keep the best
``keep`` of the active weights with the deterministic top-k, regrow the best ``grow`` of the
rest, install) is written once, in ``sparsity.update``; a method only says

- when masks change (``is_update_step``),
- how dense every weight should be after an update (``goal``) and how much of it is regrown
  (``regrow_fraction``),
- what the drop and the regrowth are scored by (``drop_scores``, ``grow_scores``).

Adding a method is a new module here and a line in the registry (``methods/__init__.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.schedules import is_update_step

log = logging.getLogger("dist_sparse.sparsity")


@dataclass(frozen=True)
class Goal:
    """The active share every weight should have after an update.

    ``densities``: per weight, for the top-k patterns (unstructured, block). ``sparsity``: the
    scheduled sparsity of the whole selection, which N:M turns into weights kept per group.
    """

    densities: dict[str, float]
    sparsity: float


class Method:
    name: ClassVar[str]
    starts_dense: ClassVar[bool] = False
    """Training begins with every weight active (GMP); else the first mask has the target density."""
    dense_grad: ClassVar[bool] = False
    """Update steps need the dense (unmasked, data-parallel averaged) gradient (RigL)."""
    changes_masks: ClassVar[bool] = True
    """False for a mask drawn once and kept (static)."""

    def __init__(self, cfg: SparsityConfig, max_steps: int, final_density: dict[str, float]):
        self.cfg = cfg
        self.start_step = int(cfg.start_fraction * max_steps)
        self.end_step = max(1, int(cfg.end_fraction * max_steps))
        self.final_density = final_density

    def check(self, max_steps: int) -> None:
        """Refuse a schedule under which this method could never change a mask."""
        if self.changes_masks and self.end_step <= self.start_step:
            raise ValueError(f"sparsity: start_fraction {self.cfg.start_fraction} and end_fraction "
                             f"{self.cfg.end_fraction} of {max_steps} steps round to the same step: widen them or "
                             "train longer")

    def is_update_step(self, step: int) -> bool:
        """Whether masks change after optimizer step ``step`` (1-based)."""
        return is_update_step(step, self.cfg.update_interval, self.end_step, self.start_step)

    def final_goal(self) -> Goal:
        return Goal(self.final_density, self.cfg.sparsity)

    def goal(self, step: int) -> Goal:
        """Densities after the update at ``step``; the always-sparse methods hold the final ones."""
        return self.final_goal()

    def regrow_fraction(self, step: int) -> float | None:
        """Share of the goal's count dropped from the active weights and regrown elsewhere at
        ``step``; None for a method that only prunes (no regrowth selection at all)."""
        return None

    def drop_scores(self, decision) -> dict[str, torch.Tensor]:
        """What the kept weights are the largest of (every method here: |w| of the fp32 masters)."""
        return decision.magnitudes()

    def grow_scores(self, decision) -> dict[str, torch.Tensor]:
        """What the regrown weights are the largest of, among those not kept."""
        raise NotImplementedError(f"{self.name} does not regrow")
