"""LAMB that stays layer-wise under ZeRO, and the parameter grouping it needs.

DeepSpeed's FusedLamb is CUDA-only and, like every optimizer ZeRO drives, it sees each param
group as one flat fp32 partition: its trust ratio ||w|| / ||update|| is then taken over a
slice of many layers, which is not LAMB. This LAMB follows FusedLamb's update rule (Adam
moments with bias correction, decoupled weight decay added to the update, trust ratio clamped
to [min_coeff, max_coeff], 1 when either norm is zero) and takes its norms per *param group*:
the training code puts every parameter in a group of its own, so each rank holds a part of
exactly one parameter per group: a ZeRO slice, an AutoTP shard, or a slice of a shard. The
squared norms are summed over the ranks holding the parts (``norm_reducer``, built in
``dist_sparse.train.engine.lamb_norm_reducer``): over the data-parallel group under ZeRO, and
for tensors AutoTP split also over the tensor-parallel group, so that a split weight gets the
trust ratio of the whole weight and tp=2 trains the same function as tp=1. Without ZeRO and TP
the groups hold whole tensors and no reduction is needed.

DeepSpeed's ZeRO 1/2/3 call ``step`` once per param group (ZeRO-1/2 swap ``param_groups`` for a
list holding that group alone, ZeRO-3 empties the other groups' params), so a call reduces the
norms of the groups that hold params, and the reducer is told which groups those are.

A param group may carry an ``l1`` weight (EarlyBERT's slimming coefficients): the subgradient
``l1 * sign(p)`` of the penalty ``l1 * sum|p|`` is added to the gradient inside the step, in fp32,
on the fp32 master values. Added to low-precision gradients instead (a hook per micro step, scaled
by 1/accumulation), it would round away under bf16: 1e-4 / 8 is below half a bf16 ulp of any
gradient above 2.6e-3. It is not part of the gradient norm DeepSpeed clips.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from dist_sparse.structure import COEF_SUFFIX, is_coefficient

# Slimming coefficients (structured pruning) have their own L1 penalty: no weight decay on top.
NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "LayerNorm.bias", COEF_SUFFIX)


class Lamb(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments (You et al., 2019) with FusedLamb's conventions.

    ``norm_reducer(sq_norms, groups)`` receives a float64 tensor of shape [len(groups), 2]
    holding this rank's squared norms (weights, update) of each param group this call steps,
    and those group dicts in row order; it must sum the tensor in place over the ranks that hold
    a part of each group's parameter (data-parallel peers under ZeRO, and tensor-parallel peers
    for a tensor AutoTP split).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 max_coeff: float = 10.0, min_coeff: float = 0.01,
                 norm_reducer: Callable[[torch.Tensor, list[dict]], None] | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("Lamb: lr, eps and weight_decay must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff, l1=0.0)
        super().__init__(params, defaults)
        self.norm_reducer = norm_reducer

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        # ZeRO-3 steps one group per call and leaves the others' params empty: only the groups
        # holding params take part, on every rank alike, so the reducer gets one row per call.
        groups = [g for g in self.param_groups if g["params"]]
        # Norms stay on the parameters' device: no host sync per tensor.
        device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
        sq_norms = torch.zeros(len(groups), 2, dtype=torch.float64, device=device)
        for gi, group in enumerate(groups):
            beta1, beta2 = group["betas"]
            pairs = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                if group["l1"]:
                    grad = grad + l1_subgradient(p, group["l1"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["bias_correction"]:
                    c1 = 1 - beta1 ** state["step"]
                    c2 = 1 - beta2 ** state["step"]
                else:
                    c1 = c2 = 1.0
                update = (m / c1) / ((v / c2).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                sq_norms[gi, 0] += p.float().square().sum().double().to(device)
                sq_norms[gi, 1] += update.square().sum().double().to(device)
                pairs.append((p, update))
            updates.append(pairs)
        if self.norm_reducer is not None:
            self.norm_reducer(sq_norms, groups)
        norms = sq_norms.sqrt()
        w_norm, u_norm = norms[:, 0], norms[:, 1]
        lo = torch.tensor([g["min_coeff"] for g in groups], dtype=torch.float64, device=device)
        hi = torch.tensor([g["max_coeff"] for g in groups], dtype=torch.float64, device=device)
        ratio = torch.minimum(torch.maximum(w_norm / u_norm.clamp_min(1e-300), lo), hi)
        trust = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        for gi, group in enumerate(groups):
            scale = (trust[gi] * -group["lr"]).float()
            for p, update in updates[gi]:
                p.add_(update.to(p.dtype) * scale.to(p.dtype))
        return loss


def l1_subgradient(p: torch.Tensor, l1: float) -> torch.Tensor:
    """``l1 * sign(p)`` in fp32: the subgradient of the penalty ``l1 * sum|p|``."""
    return l1 * torch.sign(p.float())


def add_l1_to_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Make any torch optimizer apply its param groups' ``l1`` the way ``Lamb`` does: a step
    pre-hook adds ``l1 * sign(p)`` to the gradient of every parameter of those groups, in fp32.

    Registered on the optimizer ZeRO drives (``engine.basic_optimizer``), the hook runs where
    ZeRO has reduced, unscaled and clipped the fp32 gradient of the fp32 master partition, once
    per optimizer step and group, so AdamW (torch's on the CPU, DeepSpeed's FusedAdam on CUDA)
    gets the same penalty as LAMB at every ZeRO stage and accumulation. ``Lamb`` applies ``l1``
    itself and must not get the hook too.
    """
    if isinstance(optimizer, Lamb):
        raise TypeError("Lamb applies l1 itself")

    def pre_hook(opt, args, kwargs):
        for group in opt.param_groups:
            if group.get("l1"):
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(l1_subgradient(p, group["l1"]).to(p.grad.dtype))
    optimizer.register_step_pre_hook(pre_hook)


def set_step_count(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Set the optimizer's step count (Adam/LAMB bias correction) to ``step``.

    Used when training continues on a new engine (the physical shrink of structured pruning): its
    first, priming, step created the state; the run's count carries on from here. Per-parameter
    counts (``Lamb``: an int; torch's Adam/AdamW: a tensor) and per-group ones (DeepSpeed's
    FusedAdam keeps ``group["step"]``) are both set.
    """
    for state in optimizer.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = (torch.full_like(old, step) if isinstance(old, torch.Tensor) else int(step))
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = int(step)


def parameter_groups(model: torch.nn.Module, weight_decay: float, one_per_parameter: bool,
                     l1: float = 0.0) -> list[dict]:
    """Param groups with BERT's weight-decay exclusions (biases and LayerNorm).

    ``one_per_parameter`` gives every tensor its own group, which layer-wise optimizers need
    under ZeRO (see the module docstring); ``l1`` goes to the slimming coefficients' groups
    (``Lamb`` applies it, other optimizers through ``add_l1_to_gradients``); without
    ``one_per_parameter`` the coefficients then form a group of their own.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY_SUFFIXES) else decay).append((name, p))
    if one_per_parameter:
        return ([{"params": [p], "weight_decay": weight_decay, "name": n} for n, p in decay]
                + [{"params": [p], "weight_decay": 0.0, "name": n,
                    **({"l1": l1} if l1 and is_coefficient(n) else {})} for n, p in no_decay])
    coefs = [(n, p) for n, p in no_decay if l1 and is_coefficient(n)]
    no_decay = [(n, p) for n, p in no_decay if not (l1 and is_coefficient(n))]
    groups = []
    if decay:
        groups.append({"params": [p for _, p in decay], "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": [p for _, p in no_decay], "weight_decay": 0.0})
    if coefs:
        groups.append({"params": [p for _, p in coefs], "weight_decay": 0.0, "l1": l1})
    return groups
