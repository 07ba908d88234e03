"""The hook interface of training components.

A component is one feature's part in a training step: the sparsifier, the EarlyBERT search, and
later a distillation teacher or DynaBERT's sub-network passes. The ``Trainer`` calls the hooks
in a fixed order every step, on every rank alike, so a component may run collectives in any of
them. Every hook has a default that does nothing; a component overrides what it needs.

Order within one optimizer step ``step`` (1-based, the step about to happen)::

    on_step_begin(step)
    for every micro batch:  for every pass of passes(step, micro) (one plain pass by default):
                                with pass: forward, backward
                            on_after_backward(step, micro)
                            [last micro batch: on_before_optimizer_step(step)]  engine.step()
    on_after_optimizer_step(step)                    -> scalars to log, or None
    [an engine replacement a component requested:
        on_before_engine_replaced(change)            drop references to the old engine's tensors
        ... old engine released, new engine built ...
        on_engine_replaced(change)                   -> scalars to log, or None]

``on_before_optimizer_step`` runs between the last backward and ``engine.step()``: gradients
are reduced there (ZeRO's partitions under ZeRO-2/3) and not yet applied.

``passes`` lets one component run several forward/backward passes per micro batch (DynaBERT's
sub-networks): each is a context manager entered around the loss and its backward; their
gradients add up, and only the last pass of the last micro batch is DeepSpeed's accumulation
boundary. Every rank must get the same passes (they are collectives under ZeRO-3 and TP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dist_sparse.train.trainer import Trainer


@dataclass(frozen=True)
class EngineChange:
    """What an engine replacement did to the model, for the components that must follow it."""

    reason: str                 # "shrink"
    step: int                   # optimizer steps done when it happened
    old_config: Any             # DistSparseBertConfig before
    new_config: Any = None      # and after (set once the new engine exists)
    ticket: Any = None          # structure.Ticket of a shrink: the heads and neurons kept


class Component:
    """Base class: one feature's hooks into the training step (see the module docstring)."""

    #: TensorBoard group of the scalars the hooks return
    name: str = "component"

    def on_step_begin(self, trainer: "Trainer", step: int) -> None:
        pass

    def passes(self, trainer: "Trainer", step: int, micro: int) -> list | None:
        """Context managers, one per forward/backward pass of this micro batch; None: one plain pass."""
        return None

    def on_after_backward(self, trainer: "Trainer", step: int, micro: int) -> None:
        pass

    def on_before_optimizer_step(self, trainer: "Trainer", step: int) -> None:
        pass

    def on_after_optimizer_step(self, trainer: "Trainer", step: int) -> dict[str, float] | None:
        return None

    def on_before_engine_replaced(self, trainer: "Trainer", change: EngineChange) -> None:
        pass

    def on_engine_replaced(self, trainer: "Trainer", change: EngineChange) -> dict[str, float] | None:
        return None

    def state_dict(self) -> dict | None:
        """What this component needs to resume exactly (None: nothing)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


__all__ = ["Component", "EngineChange"]
