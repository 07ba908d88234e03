"""DynaBERT's importance of attention heads and FFN neurons, and the rewiring it drives.

Head importance (Michel et al. 2019, as DynaBERT uses it): the |gradient| of the loss with
respect to a gate on the head's output, summed over batches. Neuron importance, DynaBERT's
first-order Taylor score |sum_j W1[i,j] dW1[i,j] + b1[i] db1[i]| + |sum_k W2[k,i] dW2[k,i]|,
is computed the same way: the first sum equals the gradient of a gate on neuron i's
pre-activation, the second that of a gate on its activation (both summed over the batch's
tokens), so the model runs with three gates at 1 and ``torch.autograd.grad`` asks for their
gradients only. No weight gradient is formed and no optimizer is involved, which is why this
runs on the whole (unsharded) model before the DeepSpeed engine exists.

Distributed: the batches are split over the ranks, the per-batch scores are gathered and summed
in batch order in float64, so every rank holds the same numbers, bit for bit those of one process
summing the same batches in order.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch

from dist_sparse.dynabert.subnet import deal_order
from dist_sparse.structure import reorder_units


def _layers(model):
    return model.bert.encoder.layer


@contextmanager
def measuring_gates(model, device):
    """Every layer gets a head gate, a neuron pre-activation gate and a neuron gate, all ones
    and requiring grad; yields the list of (head, pre, post) gate tensors, removes them after."""
    gates = []
    try:
        for layer in _layers(model):
            att, inter = layer.attention.self, layer.intermediate
            heads = att.query.weight.shape[0] // att.head_dim
            neurons = inter.dense.weight.shape[0]
            dtype = att.query.weight.dtype
            g = tuple(torch.ones(n, device=device, dtype=dtype, requires_grad=True) for n in (heads, neurons, neurons))
            att.head_gate, inter.neuron_pre_gate, inter.neuron_gate = g
            gates.append(g)
        yield gates
    finally:
        for layer in _layers(model):
            layer.attention.self.head_gate = None
            layer.intermediate.neuron_pre_gate = layer.intermediate.neuron_gate = None


def batch_importance(model, batch: dict, loss_of: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scores (layers, heads), neuron scores (layers, neurons)) of one batch, float64.
    ``loss_of(model, batch)`` is the loss whose gradients measure importance (the task's or MLM)."""
    device = next(model.parameters()).device
    with measuring_gates(model, device) as gates:
        loss = loss_of(model, batch)
        flat = [t for g in gates for t in g]
        grads = torch.autograd.grad(loss, flat)
    heads, neurons = [], []
    for i in range(len(gates)):
        g_head, g_pre, g_post = grads[3 * i:3 * i + 3]
        heads.append(g_head.double().abs())
        neurons.append(g_pre.double().abs() + g_post.double().abs())
    return torch.stack(heads).cpu(), torch.stack(neurons).cpu()


def measure_importance(model, batches: list[dict], loss_of: Callable, *, rank: int = 0, world: int = 1,
                       gather: Callable[[object], list] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and neuron importance summed over ``batches`` (in eval mode: no dropout).

    Rank ``r`` of ``world`` computes batches r, r + world, ...; ``gather(obj)`` returns every
    rank's object (an all-gather); the sum runs in batch order on every rank."""
    if not batches:
        raise ValueError("importance needs at least one batch")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = {}
    try:
        for j in range(rank, len(batches), world):
            batch = {k: v.to(device) for k, v in batches[j].items()}
            mine[j] = batch_importance(model, batch, loss_of)
    finally:
        model.train(was_training)
    parts: dict[int, tuple] = {}
    for got in (gather(mine) if gather is not None else [mine]):
        parts.update(got)
    if sorted(parts) != list(range(len(batches))):
        raise RuntimeError(f"importance: gathered batches {sorted(parts)}, expected 0..{len(batches) - 1}")
    heads = torch.zeros_like(parts[0][0])
    neurons = torch.zeros_like(parts[0][1])
    for j in range(len(batches)):
        heads += parts[j][0]
        neurons += parts[j][1]
    return heads, neurons


def rewiring_orders(head_scores: torch.Tensor, neuron_scores: torch.Tensor, tp: int):
    """Per layer, the permutation (position -> old unit) that sorts by importance and deals the
    units over ``tp`` shards (``subnet.deal_order``)."""
    return ([deal_order(h, tp) for h in head_scores], [deal_order(n, tp) for n in neuron_scores])


def rewire_model(model, head_orders, neuron_orders, tp: int) -> None:
    """Permute ``model``'s heads and neurons in place (a whole, unsharded model) and record the
    dealing in its config (``unit_order_tp``). The function is unchanged."""
    config = model.config
    if config.unit_order_tp is not None:
        raise ValueError("the model is already rewired (config.unit_order_tp is set)")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new = reorder_units(sd, head_orders, neuron_orders, config.head_dim)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(new[name])
    config.unit_order_tp = tp


def own_loss(model, batch: dict) -> torch.Tensor:
    """The model's own loss on the batch's labels: the task's for a classifier, MLM (and NSP
    when labelled) for a pre-training model."""
    return model(**batch).loss


def as_lists(orders: Iterable[torch.Tensor]) -> list[list[int]]:
    return [[int(i) for i in o] for o in orders]


__all__ = ["as_lists", "batch_importance", "measure_importance", "own_loss",
           "measuring_gates", "rewire_model", "rewiring_orders"]
