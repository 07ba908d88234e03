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

A loss that is not finite (NaN or inf, on any rank, in any micro batch of the step) is found
before the step's last backward: one flag per rank, summed over the whole world (the only host
sync the check adds: one per optimizer step), so every rank takes the same decision
(``training.nonfinite_loss``). "stop" raises :class:`NonFiniteLoss` before anything of the step
is applied. "skip" hands DeepSpeed a last backward whose gradients are all NaN, so that its own
overflow path skips the step the way it skips an fp16 overflow, at every ZeRO stage: gradients
dropped, no optimizer update (weights, fp32 masters, moments and the step count untouched), the
learning-rate scheduler not stepped, ``engine.skipped_steps`` counted and checkpointed,
``engine.global_steps`` still advanced with the data. The components' after-step hooks do not
run for a skipped step (no mask update, no structured check). Zeroing the gradients and calling
``step()`` would move the moments and the weight decay; not calling ``step()`` would leave
DeepSpeed's micro-step and global-step counters behind the data.

An engine is replaced only through ``replace_engine`` (a component asks for it with
``request_replacement``; it happens after every component has seen the step): the components
drop their references to the old engine's tensors, the old engine is released before the new
one is built (two would not fit on a GPU), and the components are told about the new one.
"""

from __future__ import annotations

import gc
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from dist_sparse.distributed import comm
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import link_optimizer_state
from dist_sparse.train.components import Component, EngineChange
from dist_sparse.train.losses import LossFn, pretraining_loss

log = logging.getLogger("dist_sparse.train")

NONFINITE_POLICIES = ("stop", "skip")
# Test-only fault injection: "STEP[,STEP...]:RANK" adds a NaN to global rank RANK's loss in the
# first micro batch of each of those optimizer steps. Added, not multiplied: the gradients stay
# finite, so only the run's own check of the loss can see it (DeepSpeed's gradient checks cannot).
NONFINITE_LOSS_ENV = "DIST_SPARSE_TEST_NONFINITE_LOSS"


def parse_nonfinite_injection(value: str | None) -> tuple[frozenset[int], int] | None:
    """``NONFINITE_LOSS_ENV``'s value as (steps, global rank); None when unset or empty."""
    if not value:
        return None
    try:
        steps, rank = value.rsplit(":", 1)
        parsed = frozenset(int(s) for s in steps.split(","))
        out = parsed, int(rank)
    except ValueError:
        raise ValueError(f"{NONFINITE_LOSS_ENV}={value!r}: expected STEP[,STEP...]:RANK, e.g. 5:1") from None
    if min(parsed) < 1 or out[1] < 0:
        raise ValueError(f"{NONFINITE_LOSS_ENV}={value!r}: steps start at 1, ranks at 0")
    return out


def nonfinite_skip_problem(ds: dict) -> str | None:
    """Why DeepSpeed (0.19.8) would apply an optimizer step whose gradient norm is not finite
    under DeepSpeed config ``ds`` (so that ``nonfinite_loss: "skip"`` cannot work), or None.

    fp16's loss scaler skips such a step at every stage; ZeRO-3 and the bf16 optimizer without
    ZeRO always do; ZeRO-1/2 do when they compute the gradient norm
    (``zero_optimization.compute_grad_norm``, default true) and, in bf16, when
    ``bf16.check_grad_overflow`` (default true) is on. Without ZeRO an fp32 step is applied
    unchecked.
    """
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    fp16 = bool((ds.get("fp16") or {}).get("enabled", False))
    bf16_cfg = ds.get("bf16") or ds.get("bfloat16") or {}
    bf16 = bool(bf16_cfg.get("enabled", False))
    if fp16 or stage == 3:
        return None
    if stage == 0:
        return None if bf16 else ("without ZeRO (zero_optimization.stage 0) DeepSpeed applies an fp32 step whose "
                                  "gradients are not finite; use ZeRO stage 1, 2 or 3, or bf16/fp16")
    if not zero.get("compute_grad_norm", True):
        return (f"ZeRO stage {stage} with zero_optimization.compute_grad_norm false does not check the gradient "
                "norm, so it cannot skip a step; remove compute_grad_norm")
    if bf16 and not bf16_cfg.get("check_grad_overflow", True):
        return (f"bf16 with ZeRO stage {stage} and bf16.check_grad_overflow false applies steps whose gradients "
                "are not finite; remove check_grad_overflow")
    return None


def check_nonfinite_policy(policy: str, ds: dict) -> None:
    """Refuse, before any process starts, a ``nonfinite_loss`` this DeepSpeed config cannot honour."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"training.nonfinite_loss {policy!r} is none of {', '.join(NONFINITE_POLICIES)}")
    problem = nonfinite_skip_problem(ds) if policy == "skip" else None
    if problem:
        raise ValueError(f'training.nonfinite_loss "skip": {problem} (or use "stop")')


def _ranks_text(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def nonfinite_stop_message(step: int, ranks: list[int], checkpoints: Path | None, latest: str | None) -> str:
    """What a run stopped by a non-finite loss says (the same on every rank)."""
    head = (f"step {step}: the loss is not finite (on {_ranks_text(ranks)}); training.nonfinite_loss is \"stop\": "
            f"nothing of step {step} was applied or saved. ")
    if latest is not None:
        where = f" ({checkpoints / latest})" if checkpoints is not None else ""
        head += f"The last complete checkpoint is {latest}{where}: continue from it with --resume "
    else:
        head += "No checkpoint has been saved yet: start the run again "
    return head + ("once the cause is fixed (a lower learning rate, other data), or set training.nonfinite_loss "
                   "to \"skip\" to skip such steps")


class NonFiniteLoss(ValueError):
    """The run stops on a non-finite loss (``nonfinite_loss: "stop"``). A ValueError so that the
    entry point reports it as one line per rank and exits 2, like a refusal."""

    def __init__(self, step: int, ranks: list[int], message: str):
        super().__init__(message)
        self.step, self.ranks = step, ranks


@dataclass
class StepResult:
    loss_sum: torch.Tensor   # summed micro-batch losses, float64 on the engine's device
    micro_steps: int
    tokens: torch.Tensor     # non-pad tokens of this rank's micro batches, float64 on the device
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)  # {component name: scalars}
    skipped: bool = False    # not applied: the loss was not finite and nonfinite_loss is "skip"


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
    ``nonfinite_loss``: "stop" or "skip" (``TrainingConfig.nonfinite_loss``); ``checkpoints``:
    the run's checkpoint directory, named with its ``latest`` tag when a non-finite loss stops the run.
    """

    def __init__(self, engine, model_config, groups: ParallelGroups, *, zero_stage: int,
                 build_engine: Callable[..., Any] | None = None, components: Iterable[Component] = (),
                 loss: LossFn = pretraining_loss, nonfinite_loss: str = "stop", checkpoints: Path | None = None):
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss {nonfinite_loss!r} is none of {', '.join(NONFINITE_POLICIES)}")
        self.nonfinite_loss = nonfinite_loss
        self.checkpoints = checkpoints
        self._inject = parse_nonfinite_injection(os.environ.get(NONFINITE_LOSS_ENV))
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
        if result.skipped:  # nothing changed: no mask update, no structured check, no replacement
            if self.groups.global_rank == 0:
                log.warning("step %d: the loss is not finite; the step was skipped (training.nonfinite_loss "
                            "\"skip\"), %d skipped so far", step, self.skipped_steps)
            return result
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
        skip = False
        accumulation = engine.gradient_accumulation_steps()
        for batch in micro_batches:
            passes = self._passes(step, micro)
            if passes is None:
                loss = self._loss(engine, batch, step, micro, 0)
                skip = self._backward(engine, loss, loss_sum, step) or skip
            else:
                # Several backward passes in one micro step: DeepSpeed must see only the last pass
                # of the last micro batch as the boundary (ZeRO reduces, the optimizer runs after it).
                loss = torch.zeros((), dtype=torch.float64, device=engine.device)
                for i, context in enumerate(passes):
                    engine.set_gradient_accumulation_boundary(micro + 1 == accumulation and i + 1 == len(passes))
                    with context:
                        pass_loss = self._loss(engine, batch, step, micro, i)
                    skip = self._backward(engine, pass_loss, loss_sum + loss, step) or skip
                    loss += pass_loss.detach().double()
            for c in self.components:
                c.on_after_backward(self, step, micro)
            boundary = engine.is_gradient_accumulation_boundary()
            boundaries += boundary
            if boundary:
                for c in self.components:
                    c.on_before_optimizer_step(self, step)
            engine.step()
            if boundary and skip and engine.was_step_applied():
                raise RuntimeError(f"step {step}: DeepSpeed applied an optimizer step whose gradients were made "
                                   "non-finite to skip it (see nonfinite_skip_problem)")
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
        return StepResult(loss_sum, micro, tokens, skipped=skip)

    def _loss(self, engine, batch: dict, step: int, micro: int, pass_index: int) -> torch.Tensor:
        loss = self.loss(engine, batch)
        if self._inject is not None and (micro, pass_index) == (0, 0) and step in self._inject[0] \
                and self.groups.global_rank == self._inject[1]:
            loss = loss + float("nan")  # test-only (NONFINITE_LOSS_ENV); the gradients stay finite
        return loss

    def _backward(self, engine, loss: torch.Tensor, partial: torch.Tensor, step: int) -> bool:
        """``engine.backward(loss)``; before the backward after which the optimizer runs, the
        check of the step's loss (``partial``: this rank's losses of the step so far, float64).
        Returns whether the step is to be skipped; raises NonFiniteLoss to stop."""
        if not engine.is_gradient_accumulation_boundary():
            engine.backward(loss)
            return False
        bad = self.nonfinite_ranks(partial + loss.detach().double())
        if bad and self.nonfinite_loss == "stop":
            latest = None
            if self.checkpoints is not None:
                from dist_sparse.train.checkpoint import latest_tag
                latest = latest_tag(self.checkpoints)
            raise NonFiniteLoss(step, bad, nonfinite_stop_message(step, bad, self.checkpoints, latest))
        if bad:
            # Every gradient of this backward becomes NaN on every rank, so DeepSpeed's own
            # overflow check (a global gradient norm) skips the step (see the module docstring).
            loss = loss * float("nan")
        engine.backward(loss)
        return bool(bad)

    def nonfinite_ranks(self, loss_total: torch.Tensor) -> list[int]:
        """The global ranks whose ``loss_total`` is not finite; the same list on every rank (one
        world-sized all-reduce and one read of it on the host)."""
        flags = torch.zeros(self.groups.world_size, dtype=torch.float64, device=loss_total.device)
        flags[self.groups.global_rank] = (~torch.isfinite(loss_total)).double()
        comm.all_reduce_sum_(flags)  # group None: the whole world, every DP and TP rank
        return [r for r, f in enumerate(flags.tolist()) if f]

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps not applied so far in the run: skipped for a non-finite loss, or by
        DeepSpeed itself (an fp16 overflow). DeepSpeed counts them and keeps the count in its
        checkpoints; an engine replacement carries it over."""
        return int(self.engine.skipped_steps)

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
        skipped = self.skipped_steps
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
        self.engine.skipped_steps += skipped  # DeepSpeed's counter, saved with its checkpoints
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


__all__ = ["NONFINITE_LOSS_ENV", "NonFiniteLoss", "Replacement", "StepResult", "Trainer", "check_nonfinite_policy",
           "nonfinite_skip_problem", "nonfinite_stop_message", "parse_nonfinite_injection", "release_engine"]
