"""One optimizer step over all its micro batches: the sequence the run, the tests and the
benchmarks share, so that what is tested is what runs.

DeepSpeed's ``engine.step()`` is called after every micro batch; only the last one of an
accumulation cycle is a boundary, where ZeRO reduces gradients and the optimizer runs. Whatever
must touch the reduced gradients (the sparsifier's masking, RigL's dense-gradient read) runs
between the last backward and that ``step()``, the only moment at which
``engine.is_gradient_accumulation_boundary()`` answers for the step about to happen: after
``step()`` DeepSpeed has advanced its micro-step counter and the same call answers for the next
micro batch. Whether the optimizer really changed the weights (fp16 skips a step on overflow)
is read from ``engine.was_step_applied()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from dist_sparse.distributed.zero import link_optimizer_state


@dataclass
class StepResult:
    loss_sum: torch.Tensor   # summed micro-batch losses, float64 on the engine's device
    micro_steps: int
    tokens: torch.Tensor     # non-pad tokens of this rank's micro batches, float64 on the device


class StateLink:
    """Re-links ZeRO-1/2's optimizer-state fragments once, after an engine's first applied
    optimizer step (see ``zero.link_optimizer_state``); ``reset`` for a new engine."""

    def __init__(self, zero_stage: int):
        self.zero_stage = zero_stage
        self.linked = False

    def after_step(self, engine) -> None:
        if not self.linked:
            link_optimizer_state(engine.optimizer, self.zero_stage)
            self.linked = True

    def reset(self) -> None:
        self.linked = False


def optimizer_step(engine, micro_batches: Iterable[dict], *, sparsifier=None,
                   state_link: StateLink | None = None, step: int | None = None) -> StepResult:
    """Forward and backward of every micro batch, then DeepSpeed's optimizer step.

    ``micro_batches`` yields exactly ``gradient_accumulation_steps`` batches on the engine's
    device (a generator may seed each micro step just before yielding it). ``step``: the 1-based
    number of the optimizer step about to happen (for the sparsifier's update schedule).
    """
    if sparsifier is not None:
        sparsifier.before_step(step)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
    micro, boundary = 0, False
    for batch in micro_batches:
        out = engine(**batch)
        engine.backward(out.loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and sparsifier is not None:
            sparsifier.mask_gradients()
        engine.step()
        loss_sum += out.loss.detach().double()
        if "attention_mask" in batch:
            tokens += batch["attention_mask"].sum().double()
        micro += 1
    if not boundary:
        raise RuntimeError(f"{micro} micro batches did not end at an accumulation boundary (gradient_accumulation_steps "
                           f"{engine.gradient_accumulation_steps()}): the micro batches and the engine disagree")
    # An fp16 step skipped for overflow creates no optimizer state: link after one that did.
    if state_link is not None and engine.was_step_applied():
        state_link.after_step(engine)
    return StepResult(loss_sum, micro, tokens)


__all__ = ["StateLink", "StepResult", "optimizer_step"]
