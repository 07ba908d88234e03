"""The physical shrink: from the masked model with coefficients to a smaller model, in the run.

1. Gather every parameter and its two optimizer moments as whole logical tensors on every rank:
   the fp32 master of each TP shard through ZeRO's fragment API, then the shards over the
   TP group. (Host memory: about three fp32 copies of the model per rank, held only during the
   shrink.)
2. Zero the coefficients of the removed units (this is the masked model), fold the coefficients
   into the consumers' columns (weights with c, Adam moments with 1/c and 1/c^2: the gradient of
   the folded weight is the old one divided by c), and keep only the ticket's rows and columns.
3. The trainer releases the old engine and builds a new one on the small model
   (``build_shrunk_engine``): AutoTP and ZeRO re-shard it, a priming step (a whole accumulation
   cycle) at learning rate 0 creates the optimizer state, the LR schedule and the optimizer's step count
   continue at the current step, and the carried fp32 masters and moments are written through
   the fragment API.
4. Verify: the new engine's outputs on a fixed batch must equal the masked model's (computed
   from the gathered fp32 weights) within tolerance; and the TP shards must be balanced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dist_sparse.distributed import comm
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.tp_layout import split_dim
from dist_sparse.distributed.zero import MOMENT_KEYS, ZeroAccess, link_optimizer_state
from dist_sparse.model import DistSparseBertForPreTraining
from dist_sparse.optim import set_step_count
from dist_sparse.structured.pruner import attach_coefficients
from dist_sparse.structure import (HEAD_COEF, NEURON_COEF, Ticket, fold_coefficients, is_coefficient, layer_key,
                                   shrink_state_dict, shrunk_model_config)

log = logging.getLogger("dist_sparse.structured")
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


@dataclass
class ShrinkReport:
    max_abs_diff: float
    relative_diff: float
    tolerance: float
    tp_imbalance: float
    params_before: int
    params_after: int


def logical_shapes(config, with_coefficients: bool) -> dict[str, torch.Size]:
    """Parameter shapes of the unsharded model (built on the meta device: no memory)."""

    with torch.device("meta"):
        model = DistSparseBertForPreTraining(config)
        if with_coefficients:
            attach_coefficients(model, 1)
    return {n: p.shape for n, p in model.named_parameters()}


def _tp_split(name: str, local, full, tp_size: int) -> int | None:
    # The shapes here come from our own engine, not from the user: a mismatch is an internal
    # fault and must reach the log with its traceback (main treats ValueError as bad input).
    try:
        return split_dim(name, local, full, tp_size)
    except ValueError as err:
        raise RuntimeError(f"shrink: {err}") from None


def gather_full(module, config, groups: ParallelGroups, zero: ZeroAccess, with_coefficients: bool,
                moments: bool = True) -> tuple[dict, dict]:
    """Whole fp32 tensors of every parameter (and moments) on every rank, on the CPU."""
    full_shapes = logical_shapes(config, with_coefficients)
    weights: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MOMENT_KEYS}
    for name, p in module.named_parameters():
        values = {"w": zero.full_fp32(p)}
        if moments:
            for k in MOMENT_KEYS:
                try:
                    values[k] = zero.full_state(p, k)
                except ValueError as err:  # DeepSpeed's error does not say which parameter
                    raise RuntimeError(f"shrink: no optimizer state {k!r} for {name}: {err}") from None
        dim = _tp_split(name, values["w"].shape, full_shapes[name], groups.tp_size)
        for k, v in values.items():
            v = v.view(values["w"].shape)
            if dim is not None:
                v = comm.all_gather_cat(v, groups.tp_group, dim)
            v = v.cpu()
            if k == "w":
                weights[name] = v
            else:
                states[k][name] = v
    return weights, states


def masked_weights(weights: dict, ticket: Ticket, num_layers: int) -> dict:
    """The coefficients of removed heads and neurons set to zero: the masked model."""
    out = dict(weights)
    for i in range(num_layers):
        for key, kept in ((layer_key(i, HEAD_COEF), ticket.heads[i]), (layer_key(i, NEURON_COEF), ticket.neurons[i])):
            keep = torch.zeros_like(out[key], dtype=torch.bool)
            keep[list(kept)] = True
            out[key] = torch.where(keep, out[key], torch.zeros_like(out[key]))
    return out


def shrink_tensors(weights: dict, states: dict, ticket: Ticket, config) -> tuple[dict, dict]:
    """Folded and shrunk weights and moments (pure, CPU)."""
    num_layers, head_dim = config.num_hidden_layers, config.head_dim
    coefs = {k: v for k, v in weights.items() if is_coefficient(k)}
    small_w = shrink_state_dict(fold_coefficients(weights, num_layers, head_dim, power=1), ticket, head_dim)
    small_s = {}
    for key, power in (("exp_avg", -1), ("exp_avg_sq", -2)):
        if states.get(key):
            folded = fold_coefficients(states[key], num_layers, head_dim, power=power, coefs=coefs)
            small_s[key] = shrink_state_dict(folded, ticket, head_dim)
    return small_w, small_s


def reference_outputs(weights: dict, config, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the masked model with coefficients, unsharded fp32, in eval mode."""

    model = DistSparseBertForPreTraining(config)
    attach_coefficients(model, 1)
    _load(model, weights)
    model.to(device).eval()
    with torch.no_grad():
        out = model(**batch)
    result = out.prediction_logits.float(), out.seq_relationship_logits.float()
    del model
    return result


def _load(model, weights: dict) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in TIED_KEYS]
    if missing or unexpected:
        raise RuntimeError(f"shrink: state dict mismatch (missing {missing[:4]}, unexpected {unexpected[:4]})")


def local_matmul_numel(module) -> int:
    """Weights of the encoder's matrix products this rank holds: its share of the FLOPs."""
    total = 0
    for name, p in module.named_parameters():
        if name.startswith("bert.encoder.") and name.endswith("weight") and p.dim() >= 1:
            shape = getattr(p, "ds_shape", p.shape)
            if len(shape) == 2:
                total += shape[0] * shape[1]
    return total


@dataclass
class ShrinkPlan:
    """Everything the new engine is built from, gathered while the old engine still exists."""
    small_config: object
    weights: dict            # fp32 masters of the shrunk model, whole logical tensors (CPU)
    moments: dict            # {"exp_avg": {...}, "exp_avg_sq": {...}}, folded and shrunk (CPU)
    ref_logits: torch.Tensor
    ref_nsp: torch.Tensor
    verify_batch: dict
    tolerance: float
    params_before: int
    device: torch.device


def plan_shrink(engine, config, ticket: Ticket, *, groups: ParallelGroups, zero: ZeroAccess, zero_stage: int,
                verify_batch: dict, tolerance: float | None) -> ShrinkPlan:
    """Gather the fp32 masters and moments of ``engine``, compute the masked model's reference
    outputs and the shrunk tensors. The caller then releases the old engine (it must hold the
    last reference) before ``build_shrunk_engine``: two engines would not fit on a GPU."""
    device = engine.device
    engine_dtype = next(engine.module.parameters()).dtype
    if tolerance is None:
        tolerance = 1e-4 if engine_dtype == torch.float32 else 3e-2
    params_before = sum(v.numel() for v in logical_shapes(config, True).values())
    link_optimizer_state(engine.optimizer, zero_stage)
    weights, states = gather_full(engine.module, config, groups, zero, with_coefficients=True)
    masked = masked_weights(weights, ticket, config.num_hidden_layers)
    batch = {k: v.to(device) for k, v in verify_batch.items() if k not in ("labels", "next_sentence_label")}
    ref_logits, ref_nsp = reference_outputs(masked, config, batch, device)
    small_w, small_s = shrink_tensors(masked, states, ticket, config)
    return ShrinkPlan(small_config=shrunk_model_config(config, ticket), weights=small_w, moments=small_s,
                      ref_logits=ref_logits, ref_nsp=ref_nsp, verify_batch=verify_batch, tolerance=tolerance,
                      params_before=params_before, device=device)


def build_shrunk_engine(plan: ShrinkPlan, *, build_engine, zero_stage: int, groups: ParallelGroups, zero: ZeroAccess,
                        step: int, global_batch: int, lr_lambda):
    """The engine of the shrunk model, standing at optimizer step ``step`` with the carried fp32
    masters and moments. ``build_engine(model, lr_lambda=, start_step=)`` builds an engine as
    the run builds its first one. Returns (engine, report)."""

    device, small_config = plan.device, plan.small_config
    model = DistSparseBertForPreTraining(small_config)
    _load(model, plan.weights)
    # The optimizer state must exist before carried moments can be written through the fragment
    # API, and ZeRO creates it only in an optimizer step (ZeRO-3 keeps it on flat partitions it
    # alone knows). So the new engine takes one priming step, a whole accumulation cycle of zero
    # losses at learning rate 0, which leaves every weight as loaded (LAMB: p += 0 * update; AdamW's decay is lr-scaled) and
    # ends on an accumulation boundary, so the run's micro batches stay aligned with DeepSpeed's
    # boundaries; its schedule starts one step early so that afterwards it stands at ``step``.
    priming = [True]

    def lr_fn(s: int) -> float:
        return 0.0 if priming[0] else lr_lambda(s)

    new = build_engine(model, lr_lambda=lr_fn, start_step=step - 1)
    del model
    new.train()
    for _ in range(new.gradient_accumulation_steps()):
        out = new(**{k: v.to(device) for k, v in plan.verify_batch.items()})
        new.backward(out.loss * 0.0)
        boundary = new.is_gradient_accumulation_boundary()
        if boundary:
            priming[0] = False  # the scheduler steps after the optimizer: it then reads the run's lr
        new.step()
    assert boundary and new.was_step_applied(), "the priming cycle did not end with an optimizer step"
    new.global_steps, new.global_samples = step, step * global_batch
    set_step_count(new.basic_optimizer, step)  # LAMB's and Adam's bias correction continue
    link_optimizer_state(new.optimizer, zero_stage)
    # The fp32 masters are carried, not re-derived from the (bf16-rounded) module weights; the
    # module's low-precision copy is already the rounding of the same values.
    full_shapes = logical_shapes(small_config, False)
    for name, p in new.module.named_parameters():
        local_shape = tuple(getattr(p, "ds_shape", p.shape))
        dim = _tp_split(name, local_shape, full_shapes[name], groups.tp_size)

        def local(value):
            if dim is not None:
                n = local_shape[dim]
                value = value.narrow(dim, groups.tp_rank * n, n)
            return value.contiguous().to(device)
        zero.set_full_fp32(p, local(plan.weights[name]))
        for key, moments in plan.moments.items():
            zero.set_full_state(p, local(moments[name]), key)

    batch = {k: v.to(device) for k, v in plan.verify_batch.items() if k not in ("labels", "next_sentence_label")}
    new.eval()
    with torch.no_grad():
        out = new(**batch)
    new.train()
    diff = max(float((out.prediction_logits.float() - plan.ref_logits).abs().max()),
               float((out.seq_relationship_logits.float() - plan.ref_nsp).abs().max()))
    scale = max(float(plan.ref_logits.abs().max()), float(plan.ref_nsp.abs().max()), 1e-30)
    # Every rank must reach the same verdict (TP ranks compute the same outputs; DP ranks too).
    verdict = torch.tensor([diff / scale], dtype=torch.float64)
    comm.all_reduce_sum_(verdict)
    relative = float(verdict) / comm.world_size()
    if relative > plan.tolerance:
        raise RuntimeError(f"structured pruning: the shrunk model's outputs differ from the masked model's by "
                           f"{relative:.3g} (relative to the largest logit), above the tolerance {plan.tolerance:g}")
    shares = [local_matmul_numel(new.module)]
    if groups.tp_size > 1:
        shares = comm.all_gather_object(shares[0], groups.tp_group)
    imbalance = max(shares) / max(min(shares), 1)
    report = ShrinkReport(max_abs_diff=diff, relative_diff=relative, tolerance=plan.tolerance,
                          tp_imbalance=imbalance, params_before=plan.params_before,
                          params_after=sum(v.numel() for v in full_shapes.values()))
    return new, report


__all__ = ["ShrinkPlan", "ShrinkReport", "build_shrunk_engine", "gather_full", "logical_shapes", "masked_weights",
           "plan_shrink", "reference_outputs", "shrink_tensors"]
