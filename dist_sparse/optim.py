"""LAMB that stays layer-wise under ZeRO, in a handful of kernels per step, and the parameter
grouping it needs.

DeepSpeed's FusedLamb is CUDA-only and, like every optimizer ZeRO drives, it sees each param
group as one flat fp32 partition: its trust ratio ||w|| / ||update|| is then taken over a
slice of many layers, which is not LAMB. This LAMB follows FusedLamb's update rule (Adam
moments with bias correction, decoupled weight decay added to the update, trust ratio clamped
to [min_coeff, max_coeff], 1 when either norm is zero) and takes its norms per *tensor* (a
"row"), wherever the tensor's elements lie:

- without ZeRO a param group holds the tensors themselves: the moments and the update run as
  multi-tensor (``torch._foreach_*``) operations over the group, the norms come from one
  ``_foreach_norm``;
- under ZeRO-1/2/3 (and DeepSpeed's BF16_Optimizer) a group is one flat fp32 partition per
  rank, a concatenation of fragments of its tensors (and alignment padding). ``segments``
  (built by ``dist_sparse.train.engine.lamb_segments`` once the engine exists) says, per flat
  tensor, which runs of elements belong to which row; the squared norms of all rows come from
  one ``segment_reduce``, and the trust ratio goes back to the elements with one
  ``repeat_interleave`` of known output size.

So the param groups are BERT's few (decay, no decay, the slimming coefficients), DeepSpeed calls
``step`` once per group (ZeRO-1/2 swap ``param_groups`` for a list holding that group alone,
ZeRO-3 empties the other groups' params), and a call costs a fixed number of kernels whatever the
number of layers, no host synchronisation (the step count, bias corrections, learning rate and
clamps are Python numbers) and at most one all-reduce: the rows' squared norms are summed over the
ranks holding parts of each tensor by ``norm_reducer(sq_norms, names)``, built in
``dist_sparse.train.engine.lamb_norm_reducer``: over the data-parallel group under ZeRO, and for
tensors AutoTP split also over the tensor-parallel group, so that a split weight gets the trust
ratio of the whole weight and tp=2 trains the same function as tp=1.

A param group may carry an ``l1`` weight (EarlyBERT's slimming coefficients): the subgradient
``l1 * sign(p)`` of the penalty ``l1 * sum|p|`` is added to the gradient inside the step, in fp32,
on the fp32 master values. Added to low-precision gradients instead (a hook per micro step, scaled
by 1/accumulation), it would round away under bf16: 1e-4 / 8 is below half a bf16 ulp of any
gradient above 2.6e-3. It is not part of the gradient norm DeepSpeed clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from dist_sparse.structure import COEF_SUFFIX, is_coefficient

# Slimming coefficients (structured pruning) have their own L1 penalty: no weight decay on top.
NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "LayerNorm.bias", COEF_SUFFIX)


@dataclass
class Segments:
    """How one flat tensor that a param group steps divides into its tensors' parts.

    ``lengths`` cover the flat tensor from its first element to its last, in order; ``rows``
    names the row (index into the group's ``names``) of each run, -1 for padding. The device
    copies are made on first use and kept.
    """

    lengths: list[int]
    rows: list[int]
    _device: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        assert len(self.lengths) == len(self.rows) and all(n >= 0 for n in self.lengths)

    @property
    def numel(self) -> int:
        return sum(self.lengths)

    def on(self, device: torch.device, padding_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lengths, rows) as device tensors; padding runs point at ``padding_row``."""
        key = (device, padding_row)
        if key not in self._device:
            rows = [padding_row if r < 0 else r for r in self.rows]
            self._device[key] = (torch.tensor(self.lengths, dtype=torch.int64).to(device),
                                 torch.tensor(rows, dtype=torch.int64).to(device))
        return self._device[key]


def row_names(group: dict) -> list:
    """The names of a group's rows (its tensors): ``names`` of a group built by
    ``parameter_groups``, ``name`` of a one-tensor group, else unnamed rows, one per param."""
    if "names" in group:
        return list(group["names"])
    if "name" in group:
        return [group["name"]]
    return [None] * len(group["params"])


class Lamb(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments (You et al., 2019) with FusedLamb's conventions.

    ``norm_reducer(sq_norms, names)`` receives a float64 tensor of shape [rows, 2] holding this
    rank's squared norms (weights, update) of the rows of the groups this call steps, and the
    rows' names in order; it must sum the tensor in place over the ranks that hold a part of each
    row's tensor (data-parallel peers under ZeRO, and tensor-parallel peers for a tensor AutoTP
    split). ``segments``: id of a flat tensor -> its ``Segments`` (see the module docstring); a
    tensor without an entry is one row of its own, in the order of the group's params.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 max_coeff: float = 10.0, min_coeff: float = 0.01,
                 norm_reducer: Callable[[torch.Tensor, list], None] | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("Lamb: lr, eps and weight_decay must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff, l1=0.0)
        super().__init__(params, defaults)
        self.norm_reducer = norm_reducer
        self.segments: dict[int, Segments] = {}

    def _moments_and_updates(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Advance the moments of ``params`` and return their updates (fp32), multi-tensor."""
        beta1, beta2 = group["betas"]
        grads = [p.grad.float() for p in params]
        masters = [p if p.dtype == torch.float32 else p.float() for p in params]
        if group["l1"]:  # out of place: the gradients DeepSpeed holds stay as they are
            grads = torch._foreach_add(grads, torch._foreach_sign(masters), alpha=group["l1"])
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
        ms = [self.state[p]["exp_avg"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(ms, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        step = self.state[params[0]]["step"]  # the same for every tensor of a group
        c1, c2 = (1 - beta1 ** step, 1 - beta2 ** step) if group["bias_correction"] else (1.0, 1.0)
        denom = torch._foreach_div(vs, c2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(ms, c1)
        torch._foreach_div_(updates, denom)
        if group["weight_decay"]:
            torch._foreach_add_(updates, masters, alpha=group["weight_decay"])
        return updates

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # ZeRO-3 steps one group per call and leaves the others' params empty: only the groups
        # holding params take part, on every rank alike, so the reducer's rows match.
        groups = [g for g in self.param_groups if g["params"]]
        if not groups:
            return loss
        device = groups[0]["params"][0].device
        names: list = []
        parts = []  # per group: (rows offset, params, updates, segments or None)
        sq_rows = []
        for group in groups:
            base, rows = len(names), row_names(group)
            names.extend(rows)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                sq_rows.append(torch.zeros(len(rows), 2, dtype=torch.float64, device=device))
                parts.append((base, [], [], None))
                continue
            updates = self._moments_and_updates(group, params)
            flat = self.segments.get(id(params[0])) if len(params) == 1 else None
            if flat is not None:
                p, u = params[0], updates[0]
                assert flat.numel == p.numel(), "Lamb.segments do not cover this flat partition: rebuild them"
                lengths, seg_rows = flat.on(device, len(rows))
                w = p if p.dtype == torch.float32 else p.float()
                per_segment = torch.stack([torch.segment_reduce(w * w, "sum", lengths=lengths),
                                           torch.segment_reduce(u * u, "sum", lengths=lengths)], dim=1)
                sq = torch.zeros(len(rows) + 1, 2, dtype=torch.float64, device=device)
                sq.index_add_(0, seg_rows, per_segment.double())
                sq_rows.append(sq[:-1])  # the last row collected the padding
            else:
                if len(params) != len(rows):
                    raise RuntimeError(f"Lamb: a group with {len(rows)} named tensors steps {len(params)} "
                                       "tensors without segments (a flat ZeRO partition needs Lamb.segments)")
                w_norms = torch._foreach_norm([p if p.dtype == torch.float32 else p.float() for p in params])
                u_norms = torch._foreach_norm(updates)
                sq_rows.append(torch.stack([torch.stack(w_norms), torch.stack(u_norms)], dim=1).double().square())
            parts.append((base, params, updates, flat))
        sq_norms = torch.cat(sq_rows)
        if self.norm_reducer is not None:
            self.norm_reducer(sq_norms, names)
        norms = sq_norms.sqrt()
        w_norm, u_norm = norms[:, 0], norms[:, 1]
        ratio = w_norm / u_norm.clamp_min(1e-300)
        for group, (base, params, updates, flat) in zip(groups, parts):
            if not params:
                continue
            rows = slice(base, base + len(row_names(group)))
            r = ratio[rows].clamp(group["min_coeff"], group["max_coeff"])
            trust = torch.where((w_norm[rows] > 0) & (u_norm[rows] > 0), r, 1.0).float() * -group["lr"]
            if flat is not None:
                p, u = params[0], updates[0]
                lengths, seg_rows = flat.on(device, len(row_names(group)))
                per_element = torch.repeat_interleave(torch.cat([trust, trust.new_zeros(1)])[seg_rows], lengths,
                                                      output_size=p.numel())
                p.add_((u * per_element).to(p.dtype))
            else:
                torch._foreach_mul_(updates, list(trust.unbind()))
                if all(p.dtype == torch.float32 for p in params):
                    torch._foreach_add_(params, updates)
                else:
                    torch._foreach_add_(params, [u.to(p.dtype) for p, u in zip(params, updates)])
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
        groups.append({"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0})
    if coefs:
        groups.append({"params": [p for _, p in coefs], "names": [n for n, _ in coefs], "weight_decay": 0.0, "l1": l1})
    return groups
