"""EarlyBERT as a training component: the search after every optimizer step, and the physical
shrink as an engine replacement the Trainer carries out.

The decisions live in ``dist_sparse.structured`` (pruner: the coefficients and the early-bird
search; shrink: gathering, folding and cutting the tensors, building the small engine); this
module only wires them into the step and says what is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from dist_sparse.model.presets import dense_flops_per_token
from dist_sparse.structured.pruner import StructuredPruner
from dist_sparse.structured.shrink import ShrinkPlan, build_shrunk_engine, plan_shrink
from dist_sparse.train.components import Component, EngineChange

log = logging.getLogger("dist_sparse.structured")

# Above this ratio of the largest to the smallest TP shard's FLOPs the shrink failed its purpose.
MAX_TP_IMBALANCE = 1.10


class EarlyBertComponent(Component):
    """The structured search (``StructuredPruner``) inside the step; draws the ticket, then asks
    the Trainer for the shrink.

    ``verify_batch``: a fixed batch, the same on every rank, on which the shrunk model must give
    the masked model's outputs; ``global_batch``/``lr_lambda``: what the new engine continues.
    """

    name = "structured"

    def __init__(self, pruner: StructuredPruner, *, zero_stage: int, verify_batch: dict, seq_len: int,
                 global_batch: int, lr_lambda: Callable[[int], float], is_rank0: bool):
        self.pruner = pruner
        self.zero_stage = zero_stage
        self.verify_batch = verify_batch
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.lr_lambda = lr_lambda
        self.is_rank0 = is_rank0

    def bind(self, trainer) -> None:
        """Find the coefficients on the trainer's engine (at start-up)."""
        self.pruner.bind(trainer.engine.module)

    def on_after_optimizer_step(self, trainer, step: int) -> dict[str, float] | None:
        if not self.pruner.is_check_step(step):
            return None
        obs, scalars = self.pruner.check(step)
        if obs.drawn:
            trainer.request_replacement(Shrink(self, EngineChange("shrink", step, trainer.model_config,
                                                                  ticket=self.pruner.ticket)))
        return scalars

    def on_before_engine_replaced(self, trainer, change: EngineChange) -> None:
        if change.reason == "shrink":
            self.pruner.mark_shrunk()  # drops its references to the old coefficients

    def on_engine_replaced(self, trainer, change: EngineChange) -> None:
        self.pruner.bind(trainer.engine.module)

    def state_dict(self) -> dict:
        return {**self.pruner.state_dict(), "config": self.pruner.cfg.model_dump()}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state)


@dataclass
class Shrink:
    """The physical shrink as a ``trainer.Replacement``: plan on the old engine, build the small one."""

    owner: EarlyBertComponent
    change: EngineChange
    component: str = EarlyBertComponent.name

    def plan(self, trainer) -> ShrinkPlan:
        pruner = self.owner.pruner
        return plan_shrink(trainer.engine, trainer.model_config, pruner.ticket, groups=trainer.groups,
                           zero=pruner.zero, zero_stage=self.owner.zero_stage, verify_batch=self.owner.verify_batch,
                           tolerance=pruner.cfg.verify_tolerance)

    def build(self, trainer, plan: ShrinkPlan) -> tuple[Any, Any, dict[str, float]]:
        owner, pruner, step = self.owner, self.owner.pruner, self.change.step
        engine, report = build_shrunk_engine(plan, build_engine=trainer.build_engine, zero_stage=owner.zero_stage,
                                             groups=trainer.groups, zero=pruner.zero, step=step,
                                             global_batch=owner.global_batch, lr_lambda=owner.lr_lambda)
        old, small = self.change.old_config, plan.small_config
        before = dense_flops_per_token(old, owner.seq_len, training=True)
        after = dense_flops_per_token(small, owner.seq_len, training=True)
        if owner.is_rank0:
            log.info("structured pruning: ticket drawn at step %d%s; heads per layer %s, FFN widths %s; parameters "
                     "%d -> %d, training FLOPs per token x%.3f; outputs match the masked model to %.2g (relative); "
                     "TP shard imbalance %.3f", step, " (forced: max_search_steps)" if pruner.forced else "",
                     small.layer_num_heads, small.layer_intermediate_sizes, report.params_before,
                     report.params_after, after / before, report.relative_diff, report.tp_imbalance)
        if report.tp_imbalance > MAX_TP_IMBALANCE:
            raise RuntimeError(f"tensor-parallel shards are unbalanced after the shrink ({report.tp_imbalance:.3f}x)")
        scalars = {"ticket_step": float(step), "shrink/relative_diff": report.relative_diff,
                   "shrink/tp_imbalance": report.tp_imbalance, "params": float(report.params_after),
                   "train_flops_per_token": after, "flop_ratio": after / before}
        return engine, small, scalars


__all__ = ["EarlyBertComponent", "Shrink"]
