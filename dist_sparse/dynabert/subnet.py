"""DynaBERT's sub-networks as pure functions: which layers a depth keeps, how many heads and
neurons a width keeps, the rewiring order, and the state dict of one sub-network.

Width ``m`` keeps the ``m * H`` most important heads and ``m * I`` most important FFN neurons of
every layer (hidden size and embeddings unchanged); depth ``d`` keeps ``d * L`` layers spread
evenly (DynaBERT's rule: kept layer ``i`` is ``floor(i * L / (d * L))``, so 0.5 keeps every
other layer and 0.75 drops every fourth).

Rewiring under tensor parallelism. AutoTP gives TP rank ``r`` the ``r``-th contiguous block of
``H / tp`` heads (and ``I / tp`` neurons). Sorting by importance and cutting a global prefix
would leave the higher shards idle at small widths, so the sorted units are dealt round-robin:
the unit of importance rank ``k * tp + r`` goes to shard ``r``, local slot ``k``. Then every
shard's local prefix of ``m * H / tp`` units is its share of the global top ``m * H``: tp = 1 and
tp = 2 choose the same units, and each shard does the same amount of work. Which units a width
keeps is a function of the position's rank, recorded as the model config's ``unit_order_tp``,
so any layout (another TP degree, the unsharded export) finds the same sub-network.

Everything here runs on plain tensors in one process.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from dist_sparse.structure import LAYER_PREFIX, Ticket, shrink_state_dict, shrunk_model_config


def _fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10_000)


def kept_layers(depth: float, num_layers: int) -> list[int]:
    """The layers depth multiplier ``depth`` keeps (0-based, increasing)."""
    count = _fraction(depth) * num_layers
    if not 0 < depth <= 1 or count.denominator != 1:
        usable = ", ".join(_fmt(k / num_layers) for k in range(1, num_layers + 1))
        raise ValueError(f"depth multiplier {depth} does not keep a whole number of the {num_layers} layers; "
                         f"usable: {usable}")
    n = int(count)
    return [i * num_layers // n for i in range(n)]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def usable_widths(num_heads: int, intermediate: int, tp: int) -> list[float]:
    """Width multipliers that keep whole heads and whole neurons, the same number on every one of
    ``tp`` shards."""
    out = []
    for j in range(1, num_heads // tp + 1):
        m = Fraction(j * tp, num_heads)
        if (m * intermediate).denominator == 1 and int(m * intermediate) % tp == 0:
            out.append(float(m))
    return out


def width_counts(width: float, num_heads: int, intermediate: int, tp: int) -> tuple[int, int]:
    """(heads, neurons) per layer that width multiplier ``width`` keeps; ValueError naming the
    usable multipliers when it does not give whole heads and neurons on every TP shard."""
    m = _fraction(width)
    heads, neurons = m * num_heads, m * intermediate
    if (not 0 < width <= 1 or heads.denominator != 1 or neurons.denominator != 1
            or int(heads) % tp or int(neurons) % tp):
        usable = ", ".join(_fmt(w) for w in usable_widths(num_heads, intermediate, tp)) or "none"
        raise ValueError(f"width multiplier {width} does not keep whole heads and FFN neurons on every "
                         f"tensor-parallel shard ({num_heads} heads, {intermediate} neurons, TP degree {tp}); "
                         f"usable: {usable}")
    return int(heads), int(neurons)


def deal_order(importance: torch.Tensor, tp: int) -> torch.Tensor:
    """The rewiring permutation of one layer's units: position ``p`` receives old unit
    ``order[p]``. Units sorted by importance (descending; ties by index, so every rank agrees),
    then dealt round-robin over ``tp`` shards (see the module docstring)."""
    n = importance.numel()
    if n % tp:
        raise ValueError(f"{n} units do not split over TP degree {tp}")
    ranked = torch.sort(importance.double(), descending=True, stable=True).indices
    per = n // tp
    order = torch.empty(n, dtype=torch.long)
    for r in range(tp):
        order[r * per:(r + 1) * per] = ranked[r::tp]
    return order


def position_rank(n: int, tp: int | None) -> torch.Tensor:
    """Importance rank of the unit at each of ``n`` positions after :func:`deal_order` with
    ``tp`` (None: not rewired, rank = position)."""
    p = torch.arange(n)
    if tp is None or tp == 1:
        return p
    per = n // tp
    return (p % per) * tp + p // per


def unit_gate(n: int, keep: int, tp: int | None) -> torch.Tensor:
    """A 0/1 float vector over ``n`` positions: 1 where the unit is among the ``keep`` most
    important."""
    return (position_rank(n, tp) < keep).float()


def kept_units(n: int, keep: int, tp: int | None) -> tuple[int, ...]:
    """Positions (increasing) of the ``keep`` most important of ``n`` units."""
    return tuple(int(i) for i in torch.nonzero(position_rank(n, tp) < keep).flatten())


def subnetwork_ticket(config, width: float) -> Ticket:
    """The heads and neurons width ``width`` keeps in every layer, as a structure.Ticket."""
    tp = config.unit_order_tp
    heads, neurons = width_counts(width, config.num_attention_heads, config.intermediate_size, tp or 1)
    L = config.num_hidden_layers
    return Ticket(tuple(kept_units(config.num_attention_heads, heads, tp) for _ in range(L)),
                  tuple(kept_units(config.intermediate_size, neurons, tp) for _ in range(L)))


def subnetwork_state_dict(sd: dict[str, torch.Tensor], config, width: float, depth: float,
                          prefix: str = LAYER_PREFIX):
    """(state dict, model config) of the standalone sub-network (width, depth) of a rewired model:
    the kept heads and neurons cut out of every layer, the dropped layers removed and the kept
    ones renumbered 0..n-1. Any other keys (embeddings, heads on top) are kept as they are."""
    layers = kept_layers(depth, config.num_hidden_layers)
    ticket = subnetwork_ticket(config, width)
    small = shrink_state_dict(sd, ticket, config.head_dim, prefix)
    out = {}
    renumber = {old: new for new, old in enumerate(layers)}
    for key, value in small.items():
        if key.startswith(prefix):
            layer, rest = key[len(prefix):].split(".", 1)
            if int(layer) not in renumber:
                continue
            key = f"{prefix}{renumber[int(layer)]}.{rest}"
        out[key] = value
    cut = Ticket(tuple(ticket.heads[i] for i in layers), tuple(ticket.neurons[i] for i in layers))
    data = config.to_dict()
    for k in ("model_type", "transformers_version", "architectures"):
        data.pop(k, None)
    data.update(num_hidden_layers=len(layers), unit_order_tp=None, layer_num_heads=None,
                layer_intermediate_sizes=None)
    cfg = type(config)(**data)
    cfg = shrunk_model_config(cfg, cut)
    if cfg.is_uniform():
        cfg.layer_num_heads = cfg.layer_intermediate_sizes = None
    return out, cfg


def subnetwork_name(width: float, depth: float) -> str:
    return f"w{_fmt(width)}_d{_fmt(depth)}"


__all__ = ["deal_order", "kept_layers", "kept_units", "position_rank", "subnetwork_name", "subnetwork_state_dict",
           "subnetwork_ticket", "unit_gate", "usable_widths", "width_counts"]
