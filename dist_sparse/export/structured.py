"""From the weights as trained to the weights an export writes, for structured-pruning checkpoints.

A checkpoint is in one of three states (``structure.json``'s ``"structured"``):

* none -- a plain model, uniform sizes: exported as is.
* ``"search"`` -- EarlyBERT is still looking for the ticket: the model has its original sizes
  plus one slimming coefficient per head and per FFN neuron that scales the unit's output.
  Both formats fold the coefficients into the consumer's columns (exact:
  ``dist_sparse.structure.fold_coefficients``); nothing is removed yet.
* ``"shrunk"`` -- the small model, per-layer head counts and FFN widths, with the ticket naming
  which ORIGINAL heads / neurons each layer kept. compact writes it as is; dense pads it back
  to the original sizes with zero rows/columns at the original indices
  (``dist_sparse.structure.pad_state_dict``), so a stock ``BertConfig`` describes it and the
  function stays exactly the same.

All pure functions on ``{name: tensor}`` dicts, one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_sparse.structure import Ticket, fold_coefficients, is_coefficient, pad_state_dict


@dataclass(frozen=True)
class TrainedStructure:
    """The model config as trained and the structured-pruning state of the checkpoint."""

    config: object                 # DistSparseBertConfig
    structured: dict | None

    @property
    def phase(self) -> str | None:
        return None if not self.structured else self.structured.get("phase")

    @property
    def ticket(self) -> Ticket | None:
        t = None if not self.structured else self.structured.get("ticket")
        return None if t is None else Ticket.from_dict(t)

    def kept_units(self) -> list[dict]:
        """Per layer: the original indices of the heads and FFN neurons the trained model has.

        A shrunk model's ticket names them; an unshrunk model has all of them. A model with
        per-layer sizes but no ticket cannot say which original units it kept.
        """
        cfg = self.config
        layers = cfg.num_hidden_layers
        ticket = self.ticket if self.phase == "shrunk" else None
        if ticket is None:
            if not cfg.is_uniform():
                raise ValueError("the checkpoint's model has per-layer head counts / FFN widths but no structured-"
                                 "pruning ticket saying which original heads and neurons they are; only "
                                 "--format compact can export it")
            return [{"heads": list(range(cfg.num_attention_heads)), "neurons": list(range(cfg.intermediate_size))}
                    for _ in range(layers)]
        if len(ticket.heads) != layers:
            raise ValueError(f"the structured-pruning ticket describes {len(ticket.heads)} layers, the model has {layers}")
        for i in range(layers):
            if len(ticket.heads[i]) != cfg.heads_of(i) or len(ticket.neurons[i]) != cfg.intermediate_of(i):
                raise ValueError(f"layer {i}: the ticket keeps {len(ticket.heads[i])} heads / {len(ticket.neurons[i])} "
                                 f"FFN neurons but the model config has {cfg.heads_of(i)} / {cfg.intermediate_of(i)}")
            if max(ticket.heads[i]) >= cfg.num_attention_heads or max(ticket.neurons[i]) >= cfg.intermediate_size:
                raise ValueError(f"layer {i}: the ticket names units beyond the original {cfg.num_attention_heads} "
                                 f"heads / {cfg.intermediate_size} FFN neurons")
        return [{"heads": list(h), "neurons": list(n)} for h, n in zip(ticket.heads, ticket.neurons)]


def fold(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Slimming coefficients folded into ``attention.output.dense`` / ``output.dense`` columns
    (no-op without coefficients). Exact up to fp32 rounding of one multiplication per weight."""
    if not any(is_coefficient(k) for k in sd):
        return dict(sd)
    return fold_coefficients(sd, config.num_hidden_layers, config.head_dim)


def uniform_config(config):
    """The same config with every layer at the original head count and FFN width."""
    from dist_sparse.model.config import DistSparseBertConfig

    data = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        data.pop(key, None)
    data["layer_num_heads"] = None
    data["layer_intermediate_sizes"] = None
    return DistSparseBertConfig(**data)


def dense_state_dict(sd: dict[str, torch.Tensor], structure: TrainedStructure) -> tuple[dict, object]:
    """Weights and config of the dense-equivalent export: original sizes, removed units as zeros."""
    kept = structure.kept_units()  # validates a shrunk model's ticket against its config
    out = fold(sd, structure.config)
    cfg = structure.config
    if cfg.is_uniform():
        return out, uniform_config(cfg)
    ticket = Ticket(tuple(tuple(k["heads"]) for k in kept), tuple(tuple(k["neurons"]) for k in kept))
    return pad_state_dict(out, ticket, cfg.head_dim, cfg.num_attention_heads, cfg.intermediate_size), uniform_config(cfg)


def compact_state_dict(sd: dict[str, torch.Tensor], structure: TrainedStructure) -> tuple[dict, object]:
    """Weights and config of the compact export: the trained per-layer sizes, coefficients folded."""
    return fold(sd, structure.config), structure.config


__all__ = ["TrainedStructure", "compact_state_dict", "dense_state_dict", "fold", "uniform_config"]
