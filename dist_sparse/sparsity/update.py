"""The one mask-update routine every method shares: score, keep the best, regrow the best of the
rest (google-research/rigl's mask updaters; DESIGN.md section 3.1).

A ``Decision`` is this rank's view of one decision of every target: its pieces (``layout``), the
step that salts the tie order, and the bytes the decision sends. Scores, eligibility and
selections stay in the pieces' flat form until the end, where the layout turns them into masks
of the form it holds, once (for bf16 ZeRO-1/2, one gather of the decided bits).

Everything stays on the device the pieces live on: scores are computed there (random draws
too: a counter-based hash of the global index, ``masks.topk.random_scores_at``), selections and
masks are bool tensors there, and no weight or gradient is copied to the host. Score dicts are
computed on access (``Scores``), so a selection that goes weight by weight holds one weight's
scores at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.masks.topk import random_scores_at, stable_seed
from dist_sparse.sparsity.layout import Layout, Pieces
from dist_sparse.sparsity.methods import Goal, Method
from dist_sparse.sparsity.patterns import Pattern
from dist_sparse.sparsity.select import on_device


class Scores(Mapping):
    """Scores of every target, each computed when it is read (and not kept): ``fn(target)``."""

    def __init__(self, targets, fn: Callable[..., torch.Tensor]):
        self._targets = {t.name: t for t in targets}
        self._fn = fn

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fn(self._targets[name])

    def __iter__(self):
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


class Decision:
    def __init__(self, cfg: SparsityConfig, layout: Layout, pattern: Pattern, step: int,
                 grad_scores: dict[str, torch.Tensor] | None = None):
        self.cfg = cfg
        self.layout = layout
        self.pattern = pattern
        self.step = step  # the update step (0: the first masks): keys random draws and tie orders
        self.grad_scores = grad_scores or {}  # RigL's |dense gradient|, in the held form
        self.sync_bytes = 0  # what this rank sent (or received, for gathers) to decide
        self._pieces: Pieces | None = None
        self.chosen: dict[str, int] = {}  # units the last selection kept, per target

    @property
    def pieces(self) -> Pieces:
        """Read on first use (a dense start reads nothing)."""
        if self._pieces is None:
            self._pieces = self.layout.pieces(self.pattern.whole_groups)
        return self._pieces

    @property
    def targets(self):
        return self.layout.targets

    def salt(self, t) -> int:
        """Of the tie order of ``t`` at this update (``masks.topk.tie_order``)."""
        return stable_seed(self.cfg.seed, self.step, t.index)

    def group(self, split: bool):
        return self.layout.decision_group(split, self.cfg.balance == "global")

    def device(self, t) -> torch.device:
        """Where ``t``'s piece lives: scores, eligibility and selections of ``t`` are made there."""
        return self.pieces.parts[t.name].values.device

    # -- scores and eligibility, in the pieces' flat form, computed on access ----------------------
    def magnitudes(self) -> Scores:
        """|w| of the pieces, from fp32 values that are identical on every rank."""
        return Scores(self.targets, lambda t: self.pieces.parts[t.name].values.abs())

    def random(self) -> Scores:
        """Uniform scores keyed by (seed, step, weight) and the global index: computed for the
        piece's elements only, on its device, the same value for the same element on every
        rank, layout and device."""
        def draw(t):
            p = self.pieces.parts[t.name]
            index = t.global_index(torch.arange(p.start, p.stop, device=p.values.device))
            return random_scores_at(index, self.cfg.seed, self.step, t.index)
        return Scores(self.targets, draw)

    def dense_gradients(self) -> Scores:
        """RigL's |dense gradient|, read in ``mask_gradients`` of this step (``updated_masks``
        lets go of them when the update is done)."""
        return Scores(self.targets, lambda t: self.from_held(t, self.grad_scores[t.name]))

    def cut(self, t, shard: torch.Tensor) -> torch.Tensor:
        """The piece's part of a tensor of the TP shard's shape."""
        p = self.pieces.parts[t.name]
        return shard.flatten()[p.start:p.stop]

    def from_held(self, t, held: torch.Tensor) -> torch.Tensor:
        return self.layout.piece_of_held(t, held, self.pieces.parts[t.name])

    def units(self, goal: Goal) -> dict[str, int]:
        return {t.name: self.pattern.units(self.cfg, t, goal, self.layout.groups.tp_size) for t in self.targets}

    def select(self, scores: dict, eligible: dict, ks: dict, at_most: bool = False) -> dict[str, torch.Tensor]:
        return self.pattern.select(self, scores, eligible, ks, at_most)

    def held(self, decided: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counter = [0]
        masks = self.layout.held_from_pieces(decided, self.pieces, counter)
        self.sync_bytes += counter[0]
        return masks


def first_masks(method: Method, decision: Decision) -> dict[str, torch.Tensor]:
    """The masks training starts from: dense (GMP), or the final densities' best by ``init``."""
    layout = decision.layout
    if method.starts_dense:  # no piece is read: the masks go where the weights are
        return {t.name: torch.ones(layout.mask_shape(t), dtype=torch.bool, device=t.param.device)
                for t in decision.targets}
    by_magnitude = decision.cfg.init == "magnitude" or decision.pattern.first_by_magnitude
    scores = decision.magnitudes() if by_magnitude else decision.random()
    eligible = {t.name: torch.ones(p.stop - p.start, dtype=torch.bool, device=p.values.device)
                for t, p in ((t, decision.pieces.parts[t.name]) for t in decision.targets)}
    return decision.held(decision.select(scores, eligible, decision.units(method.final_goal())))


def updated_masks(method: Method, decision: Decision, old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks after the update at ``decision.step``: of the active weights keep the goal's
    count minus the regrown share by ``drop_scores``; regrow among the others by ``grow_scores``
    as many as bring the weight to the goal's count (regrown weights start at zero: they were
    pruned). The active count is the previous goal's, except after masks were carried through a
    structured shrink, which keeps what survived the cut: there fewer may be kept (all of them)
    and more regrown, so the weight is back at its goal after this update."""
    step = decision.step
    total = decision.units(method.goal(step))
    active = {t.name: on_device(decision.from_held(t, old[t.name]), decision.device(t)) for t in decision.targets}
    fraction = method.regrow_fraction(step)
    if fraction is None:  # a method that only prunes (below its goal already: keeps them all)
        return decision.held(decision.select(method.drop_scores(decision), active, total, at_most=True))
    drops = {n: int(fraction * k) for n, k in total.items()}
    kept = decision.select(method.drop_scores(decision), active, {n: total[n] - drops[n] for n in total},
                           at_most=True)
    regrow = {n: total[n] - decision.chosen[n] for n in total}
    grown = decision.select(method.grow_scores(decision), {n: ~m for n, m in kept.items()}, regrow)
    decision.grad_scores.clear()  # RigL's dense gradients are spent
    # Both selections are on the pieces' device: so are the masks.
    return decision.held({n: kept[n] | grown[n] for n in kept})
