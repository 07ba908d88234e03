"""BERT described as a table of structural units, and the pure state-dict surgery built on it.

A structural unit is an attention head or an FFN neuron of one layer. Removing one removes:

=========  ===============================================  ==========================================
unit       rows (weight rows and bias entries)               columns (weight input columns)
=========  ===============================================  ==========================================
head h     ``attention.self.{query,key,value}``: rows        ``attention.output.dense``: columns
           ``h*head_dim .. (h+1)*head_dim``                  ``h*head_dim .. (h+1)*head_dim``
neuron j   ``intermediate.dense``: row ``j``                 ``output.dense``: column ``j``
=========  ===============================================  ==========================================

Under AutoTP the "rows" modules are column-parallel (their output rows are split across the
tensor-parallel ranks) and the "columns" modules row-parallel (input columns split), so a unit
lives entirely on one TP rank: whole heads and neurons move together when a model is shrunk and
re-sharded.

EarlyBERT's slimming coefficients scale a unit's output (the head's context vector, the neuron's
activation). Their consumer is linear, so a coefficient folds exactly into the consumer's columns
-- the function is unchanged and the coefficient disappears. Everything here works on plain
``{name: tensor}`` dicts (weights, or optimizer moments of the same shapes), one process, no
communication: the distributed code gathers what it needs and calls these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYER_PREFIX = "bert.encoder.layer."
HEAD_ROW_MODULES = ("attention.self.query", "attention.self.key", "attention.self.value")
HEAD_COL_MODULES = ("attention.output.dense",)
NEURON_ROW_MODULES = ("intermediate.dense",)
NEURON_COL_MODULES = ("output.dense",)
# Parameter names (suffixes after the layer prefix) of the slimming coefficients.
HEAD_COEF = "attention.self.slimming_coef"
NEURON_COEF = "intermediate.slimming_coef"
COEF_SUFFIX = "slimming_coef"


def layer_key(layer: int, suffix: str, prefix: str = LAYER_PREFIX) -> str:
    return f"{prefix}{layer}.{suffix}"


def is_coefficient(name: str) -> bool:
    return name.endswith(COEF_SUFFIX)


@dataclass(frozen=True)
class Ticket:
    """Which original heads and FFN neurons each layer keeps (sorted original indices)."""

    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if len(self.heads) != len(self.neurons):
            raise ValueError("a ticket needs as many head lists as neuron lists (one per layer)")
        for kind, lists in (("head", self.heads), ("neuron", self.neurons)):
            for i, kept in enumerate(lists):
                if list(kept) != sorted(set(kept)):
                    raise ValueError(f"layer {i}: kept {kind} indices must be sorted and unique")
                if not kept:
                    raise ValueError(f"layer {i} keeps no {kind}s")

    @property
    def num_heads(self) -> list[int]:
        return [len(h) for h in self.heads]

    @property
    def num_neurons(self) -> list[int]:
        return [len(n) for n in self.neurons]

    def to_dict(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "neurons": [list(n) for n in self.neurons]}

    @classmethod
    def from_dict(cls, d: dict) -> "Ticket":
        return cls(tuple(tuple(int(x) for x in h) for h in d["heads"]),
                   tuple(tuple(int(x) for x in n) for n in d["neurons"]))

    @classmethod
    def from_masks(cls, head_masks: list[torch.Tensor], neuron_masks: list[torch.Tensor]) -> "Ticket":
        return cls(tuple(tuple(int(i) for i in m.nonzero().flatten()) for m in head_masks),
                   tuple(tuple(int(i) for i in m.nonzero().flatten()) for m in neuron_masks))


def head_rows(kept_heads, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the kept heads in a Q/K/V weight: head h owns h*d .. (h+1)*d."""
    kept = torch.as_tensor(list(kept_heads), dtype=torch.long)
    return (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _coef_scale(coef: torch.Tensor, power: int) -> torch.Tensor:
    """coef**power; a zero coefficient with a negative power gives 0 (its moments restart)."""
    c = coef.double()
    if power >= 0:
        return c**power
    safe = torch.where(c == 0, torch.ones_like(c), c)
    return torch.where(c == 0, torch.zeros_like(c), safe**power)


def fold_coefficients(sd: dict[str, torch.Tensor], num_layers: int, head_dim: int, power: int = 1,
                      coefs: dict[str, torch.Tensor] | None = None, prefix: str = LAYER_PREFIX) -> dict:
    """A copy of ``sd`` with every slimming coefficient folded into its consumer's columns and
    the coefficient entries removed.

    ``power`` = 1 for weights: ``W[:, unit] *= c``. For optimizer moments of the same weight the
    re-parametrised gradient is ``g / c``, so Adam's first moment folds with power -1 and the
    second with -2. ``coefs`` gives the coefficient values when ``sd`` itself does not hold them
    (a dict of moments). Layers without coefficients are copied unchanged.
    """
    source = sd if coefs is None else coefs
    out = {k: v for k, v in sd.items() if not is_coefficient(k)}
    for layer in range(num_layers):
        hc = source.get(layer_key(layer, HEAD_COEF, prefix))
        if hc is not None:
            scale = _coef_scale(hc, power).repeat_interleave(head_dim)
            for mod in HEAD_COL_MODULES:
                key = layer_key(layer, f"{mod}.weight", prefix)
                if key in out:
                    out[key] = (out[key].double() * scale[None, :]).to(out[key].dtype)
        nc = source.get(layer_key(layer, NEURON_COEF, prefix))
        if nc is not None:
            scale = _coef_scale(nc, power)
            for mod in NEURON_COL_MODULES:
                key = layer_key(layer, f"{mod}.weight", prefix)
                if key in out:
                    out[key] = (out[key].double() * scale[None, :]).to(out[key].dtype)
    return out


def _select(sd: dict, layer: int, modules, rows: torch.Tensor, dim: int, prefix: str) -> None:
    for mod in modules:
        for leaf in ("weight", "bias"):
            key = layer_key(layer, f"{mod}.{leaf}", prefix)
            if key not in sd:
                continue
            if leaf == "bias" and dim == 1:
                continue  # a row-parallel output bias belongs to the hidden size, not to units
            sd[key] = sd[key].index_select(dim if leaf == "weight" else 0, rows).contiguous()


def shrink_state_dict(sd: dict[str, torch.Tensor], ticket: Ticket, head_dim: int,
                      prefix: str = LAYER_PREFIX) -> dict[str, torch.Tensor]:
    """Keep only the ticket's heads and neurons (any dict of weights or moments; coefficients
    must have been folded first). Units keep their original relative order."""
    if any(is_coefficient(k) for k in sd):
        raise ValueError("fold the slimming coefficients (fold_coefficients) before shrinking")
    out = dict(sd)
    for layer, (heads, neurons) in enumerate(zip(ticket.heads, ticket.neurons)):
        h_idx = head_rows(heads, head_dim)
        n_idx = torch.as_tensor(list(neurons), dtype=torch.long)
        _select(out, layer, HEAD_ROW_MODULES, h_idx, 0, prefix)
        _select(out, layer, HEAD_COL_MODULES, h_idx, 1, prefix)
        _select(out, layer, NEURON_ROW_MODULES, n_idx, 0, prefix)
        _select(out, layer, NEURON_COL_MODULES, n_idx, 1, prefix)
    return out


def reorder_units(sd: dict[str, torch.Tensor], head_orders, neuron_orders, head_dim: int,
                  prefix: str = LAYER_PREFIX) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` with every layer's heads and FFN neurons rearranged: position ``p`` of the
    result holds the old unit ``order[p]`` (a permutation per layer). Q/K/V rows and biases move
    with the attention-output columns, FFN rows and biases with the down-projection columns, so
    the model computes the same function (DynaBERT's rewiring). Works on weights and on optimizer
    moments alike (coefficients must have been folded first)."""
    if any(is_coefficient(k) for k in sd):
        raise ValueError("fold the slimming coefficients (fold_coefficients) before reordering")
    out = dict(sd)
    for layer, (heads, neurons) in enumerate(zip(head_orders, neuron_orders)):
        heads, neurons = [int(h) for h in heads], [int(n) for n in neurons]
        if sorted(heads) != list(range(len(heads))) or sorted(neurons) != list(range(len(neurons))):
            raise ValueError(f"layer {layer}: a reorder needs a permutation of every head and every neuron")
        h_idx = head_rows(heads, head_dim)
        n_idx = torch.as_tensor(neurons, dtype=torch.long)
        _select(out, layer, HEAD_ROW_MODULES, h_idx, 0, prefix)
        _select(out, layer, HEAD_COL_MODULES, h_idx, 1, prefix)
        _select(out, layer, NEURON_ROW_MODULES, n_idx, 0, prefix)
        _select(out, layer, NEURON_COL_MODULES, n_idx, 1, prefix)
    return out


def _scatter(sd: dict, layer: int, modules, rows: torch.Tensor, full: int, dim: int, prefix: str) -> None:
    for mod in modules:
        for leaf in ("weight", "bias"):
            key = layer_key(layer, f"{mod}.{leaf}", prefix)
            if key not in sd or (leaf == "bias" and dim == 1):
                continue
            small = sd[key]
            d = dim if leaf == "weight" else 0
            shape = list(small.shape)
            shape[d] = full
            big = torch.zeros(shape, dtype=small.dtype)
            big.index_copy_(d, rows, small)
            sd[key] = big


def pad_state_dict(sd: dict[str, torch.Tensor], ticket: Ticket, head_dim: int, num_heads: int,
                   intermediate_size: int, prefix: str = LAYER_PREFIX) -> dict[str, torch.Tensor]:
    """The inverse of :func:`shrink_state_dict`: every layer back to ``num_heads`` heads and
    ``intermediate_size`` neurons, removed units as exact zeros at their original positions.

    A removed head has zero Q/K/V rows and biases, so its context vector is zero, and zero
    output-projection columns; a removed neuron has a zero row, zero bias and zero down-projection
    column. Either contributes exactly nothing, so the padded model is the same function.
    """
    out = dict(sd)
    for layer, (heads, neurons) in enumerate(zip(ticket.heads, ticket.neurons)):
        h_idx = head_rows(heads, head_dim)
        n_idx = torch.as_tensor(list(neurons), dtype=torch.long)
        _scatter(out, layer, HEAD_ROW_MODULES, h_idx, num_heads * head_dim, 0, prefix)
        _scatter(out, layer, HEAD_COL_MODULES, h_idx, num_heads * head_dim, 1, prefix)
        _scatter(out, layer, NEURON_ROW_MODULES, n_idx, intermediate_size, 0, prefix)
        _scatter(out, layer, NEURON_COL_MODULES, n_idx, intermediate_size, 1, prefix)
    return out


def shrunk_model_config(config, ticket: Ticket):
    """The model config with the ticket's per-layer head counts and FFN widths."""
    from dist_sparse.model.config import DistSparseBertConfig

    data = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        data.pop(key, None)
    data["layer_num_heads"] = ticket.num_heads
    data["layer_intermediate_sizes"] = ticket.num_neurons
    return DistSparseBertConfig(**data)


__all__ = ["COEF_SUFFIX", "HEAD_COEF", "LAYER_PREFIX", "NEURON_COEF", "Ticket", "fold_coefficients",
           "head_rows", "is_coefficient", "layer_key", "pad_state_dict", "reorder_units", "shrink_state_dict",
           "shrunk_model_config"]
