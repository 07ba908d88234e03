"""The Trainer: owns the DeepSpeed engine, the model config, the parallel groups and the training
components, and runs the one optimizer-step sequence that the run, the tests and the benchmarks
share, so that what is tested is what runs.

DeepSpeed's ``engine.step()`` is called after every micro batch; only the last one of an
accumulation cycle is a boundary, where ZeRO has reduced the gradients and the optimizer runs.
Whatever must touch the reduced gradients (the sparsifier's masking, RigL's dense-gradient
read) runs between the last backward and that ``step()`` (``on_before_optimizer_step``), the
only moment at which ``engine.is_gradient_accumulation_boundary()`` answers for the step about
to happen: after ``step()`` DeepSpeed has advanced its micro-step counter. Whether the
optimizer really changed the weights (fp16 skips a step on overflow) is read from
``engine.was_step_applied()``.

An engine is replaced only through ``replace_engine`` (a component asks for it with
``request_replacement``; it happens after every component has seen the step): the components
drop their references to the old engine's tensors, the old engine is released before the new
one is built (two would not fit on a GPU), and the components are told about the new one.
"""

from __future__ import annotations

import gc
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import link_optimizer_state
from dist_sparse.train.components import Component, EngineChange
from dist_sparse.train.losses import LossFn, pretraining_loss

log = logging.getLogger("dist_sparse.train")


@dataclass
class StepResult:
    loss_sum: torch.Tensor   # summed micro-batch losses, float64 on the engine's device
    micro_steps: int
    tokens: torch.Tensor     # non-pad tokens of this rank's micro batches, float64 on the device
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)  # {component name: scalars}


class Replacement(Protocol):
    """How a new engine is made from the old one (the physical shrink is one)."""

    change: EngineChange
    component: str   # name of the component that asked (its scalars are logged in that group)

    def plan(self, trainer: "Trainer") -> Any:
        """Gather from ``trainer.engine`` what the new engine is built from (the old one still exists)."""

    def build(self, trainer: "Trainer", plan: Any) -> tuple[Any, Any, dict[str, float]]:
        """(new engine, its model config, scalars to log), built after the old engine is released."""


def release_engine(engine) -> None:
    """Free what DeepSpeed holds for ``engine``; the caller drops its own reference."""
    module = engine.module
    engine.destroy()
    _forget_zero3_module(module)
    del module
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _forget_zero3_module(module) -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps of ``module`` in globals after ``engine.destroy()``.

    DeepSpeed 0.19.8 keeps two such references, and through the module's hooks either one keeps
    the whole engine alive (its optimizer with the fp32 master partitions and both moments, and
    the parameter partitions), next to the engine built after it:

    - ``DeepSpeedZeRoOffload.__init__`` appends the top module to
      ``parameter_offload.FWD_MODULE_STACK`` and never pops it. A forward pushes and pops only
      submodules, so outside a forward the entry sits below any newer engine's and nothing reads it;
    - ``PartitionedParameterCoordinator.__params_to_release`` is a ``functools.lru_cache`` on the
      class, keyed by (coordinator, submodule, step) once the trace is complete. Emptying it only
      makes a live coordinator recompute its next entries.
    """
    try:
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator
    except ImportError:  # pragma: no cover - DeepSpeed is a dependency
        return
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        ours = {id(m) for m in module.modules()}
        stack[:] = [m for m in stack if id(m) not in ours]
    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    for fn in vars(coordinator).values() if coordinator is not None else ():
        # the lru_cache sits under DeepSpeed's instrument_w_nvtx wrapper (in its closure)
        cells = getattr(fn, "__closure__", None) or ()
        for inner in [fn] + [_cell_value(c) for c in cells]:
            if callable(getattr(inner, "cache_clear", None)):
                inner.cache_clear()


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


class Trainer:
    """Holds the engine and the components; ``train_step`` is the step sequence.

    ``build_engine(model, start_step=, lr_lambda=)`` builds an engine like the run's first one
    (the replacement's new engine uses it, so nothing outside ``train`` needs to know how).
    """

    def __init__(self, engine, model_config, groups: ParallelGroups, *, zero_stage: int,
                 build_engine: Callable[..., Any] | None = None, components: Iterable[Component] = (),
                 loss: LossFn = pretraining_loss):
        self.engine = engine
        self.model_config = model_config
        self.groups = groups
        self.zero_stage = zero_stage
        self.build_engine = build_engine
        self.components: list[Component] = list(components)
        self.loss = loss
        self._state_linked = False
        self._pending: Replacement | None = None

    # -- the step --------------------------------------------------------------------------

    def train_step(self, micro_batches: Iterable[dict], step: int) -> StepResult:
        """Forward and backward of every micro batch, DeepSpeed's optimizer step, then the
        components' after-step hooks and any engine replacement they asked for.

        ``micro_batches`` yields exactly ``gradient_accumulation_steps`` batches on the engine's
        device (a generator may seed each micro step just before yielding it). ``step``: the
        1-based number of the optimizer step about to happen.
        """
        result = self._forward_backward_step(micro_batches, step)
        for c in self.components:
            scalars = c.on_after_optimizer_step(self, step)
            if scalars:
                result.scalars.setdefault(c.name, {}).update(scalars)
        if self._pending is not None:
            replacement, self._pending = self._pending, None
            for name, scalars in self.replace_engine(replacement).items():
                result.scalars.setdefault(name, {}).update(scalars)
        return result

    def _forward_backward_step(self, micro_batches: Iterable[dict], step: int) -> StepResult:
        # A method of its own so that no local reference to the engine outlives it (a
        # replacement right after must be able to free the old engine).
        engine = self.engine
        engine.train()
        for c in self.components:
            c.on_step_begin(self, step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
        micro, boundary, boundaries = 0, False, 0
        accumulation = engine.gradient_accumulation_steps()
        for batch in micro_batches:
            passes = self._passes(step, micro)
            if passes is None:
                loss = self.loss(engine, batch)
                engine.backward(loss)
            else:
                # Several backward passes in one micro step: DeepSpeed must see only the last pass
                # of the last micro batch as the boundary (ZeRO reduces, the optimizer runs after it).
                loss = torch.zeros((), dtype=torch.float64, device=engine.device)
                for i, context in enumerate(passes):
                    engine.set_gradient_accumulation_boundary(micro + 1 == accumulation and i + 1 == len(passes))
                    with context:
                        pass_loss = self.loss(engine, batch)
                    engine.backward(pass_loss)
                    loss += pass_loss.detach().double()
            for c in self.components:
                c.on_after_backward(self, step, micro)
            boundary = engine.is_gradient_accumulation_boundary()
            boundaries += boundary
            if boundary:
                for c in self.components:
                    c.on_before_optimizer_step(self, step)
            engine.step()
            loss_sum += loss.detach().double()
            if "attention_mask" in batch:
                tokens += batch["attention_mask"].sum().double()
            micro += 1
        if not boundary or boundaries != 1:
            raise RuntimeError(f"{micro} micro batches met {boundaries} accumulation boundaries, "
                               f"{'' if boundary else 'not '}at the last one "
                               f"(gradient_accumulation_steps {engine.gradient_accumulation_steps()}): the micro "
                               "batches and the engine disagree")
        # ZeRO-1/2 keep optimizer state per flat partition; the fragment API finds it only once
        # linked, and the state exists only after a step that was applied (fp16 may skip one).
        if not self._state_linked and engine.was_step_applied():
            link_optimizer_state(engine.optimizer, self.zero_stage)
            self._state_linked = True
        return StepResult(loss_sum, micro, tokens)

    def _passes(self, step: int, micro: int) -> list | None:
        found = [(c.name, p) for c in self.components if (p := c.passes(self, step, micro)) is not None]
        if len(found) > 1:
            raise RuntimeError(f"components {[n for n, _ in found]} each ask for their own passes; only one may")
        if found and not found[0][1]:
            raise RuntimeError(f"component {found[0][0]} asked for zero passes")
        return found[0][1] if found else None

    # -- engine replacement ----------------------------------------------------------------

    def request_replacement(self, replacement: Replacement) -> None:
        """Ask for the engine to be replaced once every component has seen the current step."""
        if self._pending is not None:
            raise RuntimeError("two engine replacements requested in one step")
        self._pending = replacement

    def replace_engine(self, replacement: Replacement) -> dict[str, dict[str, float]]:
        """Plan from the old engine, release it, build the new one, tell every component.
        Returns the scalars to log, by component name."""
        change = replacement.change
        for c in self.components:
            c.on_before_engine_replaced(self, change)
        plan = replacement.plan(self)
        old_module = weakref.ref(self.engine.module)
        release_engine(self.engine)
        self.engine = None
        gc.collect()
        # Checked, not assumed: anything still holding the old module keeps a whole model (and on
        # a GPU its optimizer state) alive next to the new one.
        released = old_module() is None
        if not released:
            log.warning("the old engine's module is still referenced after its replacement; its memory stays in use")
        self.engine, new_config, built = replacement.build(self, plan)
        del plan
        self.model_config = new_config
        self._state_linked = False  # the new engine's state is linked by whoever built it, or after its first step
        change = EngineChange(change.reason, change.step, change.old_config, new_config, change.ticket)
        # logged in the group of the component that asked, e.g. structured/shrink/old_engine_released
        scalars = {replacement.component: {**built, f"{change.reason}/old_engine_released": float(released)}}
        for c in self.components:
            s = c.on_engine_replaced(self, change)
            if s:
                scalars.setdefault(c.name, {}).update(s)
        return scalars


__all__ = ["Replacement", "StepResult", "Trainer", "release_engine"]
