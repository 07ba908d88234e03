"""The sparsifier as a training component: construction, its hooks in the step, what it logs,
and how its masks follow the model through a physical shrink."""

from __future__ import annotations

import logging
from typing import Callable

from dist_sparse.config import RunConfig
from dist_sparse.distributed import comm
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import ZeroAccess
from dist_sparse.flops import training_flops_per_token
from dist_sparse.model.presets import dense_flops_per_token
from dist_sparse.sparsifier import Sparsifier, UpdateStats, check_layout, config_fingerprint
from dist_sparse.sparsity.targets import plan_targets, select_targets
from dist_sparse.structure import shrink_state_dict
from dist_sparse.train.components import Component, EngineChange

__all__ = ["SparsityComponent", "build_sparsifier", "config_fingerprint", "preflight_sparsity", "sparsity_scalars"]

log = logging.getLogger("dist_sparse.sparsity")


def build_sparsifier(engine, run_cfg: RunConfig, groups: ParallelGroups, max_steps: int) -> Sparsifier | None:
    """The run's sparsifier, validated against the sharded model, or None for a dense run.

    Every check that needs the model's shapes (patterns that match nothing, blocks or N:M groups
    that do not divide a shard) raises here, before the first step.
    """
    cfg = run_cfg.sparsity
    if cfg is None:
        return None
    if run_cfg.zero_stage not in (1, 2, 3):
        raise ValueError("sparsity needs ZeRO stage 1, 2 or 3 (zero_optimization.stage)")
    targets = select_targets(engine.module, cfg, groups.tp_rank, groups.tp_size)
    if groups.tp_size > 1:
        # AutoTP may split by heads unevenly (e.g. 12 heads over 8 ranks); the logical-shape and
        # offset arithmetic of the masks needs equal shards, so check once, on every rank.
        shapes = comm.all_gather_object([tuple(t.shard_shape) for t in targets], groups.tp_group)
        uneven = [t.name for i, t in enumerate(targets) if len({s[i] for s in shapes}) > 1]
        if uneven:
            raise ValueError(f"tensor-parallel shards of {uneven[:3]} differ in size across TP ranks; sparse "
                             "training needs autotp_size to divide the head count and FFN width evenly")
    zero = ZeroAccess(run_cfg.zero_stage, groups.dp_group, groups.dp_rank, groups.dp_size)
    return Sparsifier(cfg, targets, zero, groups, max_steps)


def preflight_sparsity(run_cfg: RunConfig, model_config, dp_size: int, max_steps: int) -> None:
    """Check the sparsity section against the model's shapes before any process group or engine
    exists, so a bad block size or N:M group fails in a second and leaves nothing behind."""
    cfg = run_cfg.sparsity
    if cfg is None:
        return
    if run_cfg.zero_stage not in (1, 2, 3):
        raise ValueError("sparsity needs ZeRO stage 1, 2 or 3 (zero_optimization.stage)")
    targets = plan_targets(model_config, cfg, run_cfg.tp_size)
    check_layout(cfg, targets, tp_size=run_cfg.tp_size, dp_size=dp_size, zero_stage=run_cfg.zero_stage,
                 max_steps=max_steps)
    sp = run_cfg.structured_pruning
    if sp is not None and cfg.pattern == "nm" and not cfg.after_shrink:
        raise ValueError("sparsity pattern \"nm\" with structured_pruning needs \"after_shrink\": true: the shrink "
                         "removes FFN neurons and heads from the input dimension, which breaks the groups of m; "
                         "with after_shrink the N:M masks are drawn on the shrunk model")
    if sp is not None and cfg.pattern in ("block", "nm"):
        # The shrink keeps whole heads (head_dim rows of Q/K/V, columns of the attention output)
        # and FFN neurons in multiples of ffn_multiple per TP shard: blocks and N:M groups must
        # fit whatever the ticket keeps, or the run would fail after the search.
        unit, what = (cfg.block_size, "sparsity.block_size") if cfg.pattern == "block" else (cfg.m, "sparsity.m")
        for size, name in ((model_config.head_dim, "the head size"), (sp.ffn_multiple, "structured_pruning.ffn_multiple")):
            if size % unit:
                raise ValueError(f"{what} {unit} does not divide {name} ({size}): after the structured shrink a "
                                 "tensor-parallel shard may keep one head or one ffn_multiple of neurons; pick a "
                                 f"{what} that divides both")


def sparsity_scalars(sp: Sparsifier, update: UpdateStats | None, dense_forward_per_token: float,
                     tokens_per_step: int) -> dict[str, float]:
    """TensorBoard scalars after a mask install: densities, churn, bytes, FLOPs of a step."""
    dens = sp.densities()
    total = sum(t.numel for t in sp.targets)
    out = {"density": sum(dens[t.name] * t.numel for t in sp.targets) / total}
    for t in sp.targets:
        out[f"density/{t.name}"] = dens[t.name]
    step_flops = training_flops_per_token(dense_forward_per_token, sp.sparse_weights()) * tokens_per_step
    out["step_tflops"] = step_flops / 1e12
    out["dense_step_tflops"] = 3 * dense_forward_per_token * tokens_per_step / 1e12
    if update is not None:
        out["churn"] = update.changed / max(update.active, 1)
        out["sync_bytes"] = float(update.sync_bytes)
        out["apply_bytes"] = float(update.apply_bytes)
    return out


class SparsityComponent(Component):
    """The sparsifier inside the step: RigL's dense-gradient switch at the step's start, gradient
    masking before the optimizer step, mask updates after it; masks carried through a shrink.

    ``sparsifier`` is None while there is none yet: ``sparsity.after_shrink`` trains dense until
    the structured shrink and draws the first masks on the small model. The sparsifier of an
    engine holds references to its parameters, so a replacement builds a new one: before it, the
    masks are gathered whole (``logical_masks``) and cut to the ticket's rows and columns; after
    it, the new sparsifier takes them over and goes on updating them, each weight returning to
    its configured density at the next update (the carried counts are what survived the cut).
    """

    name = "sparsity"

    def __init__(self, make_sparsifier: Callable[[object], Sparsifier] | None, *, seq_len: int,
                 tokens_per_step: int, sparsifier: Sparsifier | None = None):
        """``make_sparsifier(engine)`` builds the sparsifier of an engine (``build_sparsifier``);
        ``sparsifier``: one built already (it then cannot follow an engine replacement without
        ``make_sparsifier``)."""
        self.make_sparsifier = make_sparsifier
        self.seq_len = seq_len
        self.tokens_per_step = tokens_per_step
        self.sparsifier = sparsifier
        self.last_update: UpdateStats | None = None  # of the last step (None: no update)
        self._carried = None

    @classmethod
    def for_run(cls, run_cfg: RunConfig, groups: ParallelGroups, max_steps: int, seq_len: int,
                tokens_per_step: int) -> "SparsityComponent":
        return cls(lambda engine: build_sparsifier(engine, run_cfg, groups, max_steps), seq_len=seq_len,
                   tokens_per_step=tokens_per_step)

    def attach(self, trainer) -> None:
        """Build the sparsifier on the trainer's engine (no masks yet: ``start``)."""
        if self.make_sparsifier is None:
            raise RuntimeError("this sparsity component was given a sparsifier and cannot build one for a new engine")
        self.sparsifier = self.make_sparsifier(trainer.engine)

    def start(self, *, draw: bool, optimizer_has_state: bool = False) -> None:
        self.sparsifier.prepare(draw=draw, optimizer_has_state=optimizer_has_state)

    def scalars(self, trainer, update: UpdateStats | None) -> dict[str, float]:
        dense = dense_flops_per_token(trainer.model_config, self.seq_len)
        return sparsity_scalars(self.sparsifier, update, dense, self.tokens_per_step)

    # -- hooks ------------------------------------------------------------------------------

    def on_step_begin(self, trainer, step: int) -> None:
        if self.sparsifier is not None:
            self.sparsifier.before_step(step)

    def on_before_optimizer_step(self, trainer, step: int) -> None:
        if self.sparsifier is not None:
            self.sparsifier.mask_gradients()

    def on_after_optimizer_step(self, trainer, step: int) -> dict[str, float] | None:
        if self.sparsifier is None:
            return None
        update = self.last_update = self.sparsifier.step(step)
        return None if update is None else self.scalars(trainer, update)

    def on_before_engine_replaced(self, trainer, change: EngineChange) -> None:
        if self.sparsifier is None:
            return
        if change.reason != "shrink":
            raise RuntimeError(f"the sparsifier cannot follow an engine replacement of kind {change.reason!r}")
        sp = self.sparsifier
        masks = shrink_state_dict(sp.logical_masks(), change.ticket, change.old_config.head_dim)
        self._carried = (masks, sp.step_count, list(sp.history))
        sp.remove_hooks()
        self.sparsifier = None  # its targets hold the old engine's parameters

    def on_engine_replaced(self, trainer, change: EngineChange) -> dict[str, float] | None:
        self.attach(trainer)
        sp = self.sparsifier
        if self._carried is not None:
            masks, step_count, history = self._carried
            self._carried = None
            sp.prepare(draw=False)
            sp.install_logical_masks(masks, step_count, history)
            what = "carried through the shrink"
        else:  # after_shrink: the first masks, on the shrunk model's trained weights and moments
            sp.prepare(draw=True, optimizer_has_state=True)
            sp.step_count = change.step
            what = "drawn on the shrunk model"
        dens = sp.densities()
        total = sum(t.numel for t in sp.targets)
        if comm.rank() == 0:
            log.info("sparsity: masks %s at step %d; density %.4f", what, change.step,
                     sum(dens[t.name] * t.numel for t in sp.targets) / total)
        return self.scalars(trainer, None)

    def state_dict(self) -> dict | None:
        return None if self.sparsifier is None else self.sparsifier.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sparsifier.prepare(draw=False)
        self.sparsifier.load_state_dict(state)

    def load_logical_state(self, state: dict, masks: dict) -> None:
        """Resume at another layout: see ``Sparsifier.load_logical_state``."""
        self.sparsifier.prepare(draw=False)
        self.sparsifier.load_logical_state(state, masks)
