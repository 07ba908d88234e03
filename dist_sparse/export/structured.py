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

A fine-tuning run started from a shrunk model records that model's structured state (its ticket)
in its own checkpoints (``train/finetune.py``), so a fine-tuned shrunk model pads back the same
way; :func:`shrunk_record_of_export` gives it back from a compact export's sparsity.json when
the fine-tuning started from such a folder.

All pure functions on ``{name: tensor}`` dicts (and one reader of sparsity.json), one process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
                                 "pruning ticket saying which original heads and neurons they are (a fine-tuning "
                                 "run records the ticket of the shrunk checkpoint or compact export it started "
                                 "from; this one has none), so it cannot be padded back to stock BERT shapes; only "
                                 "--format compact can export it (it keeps the per-layer sizes)")
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


def shrunk_record_of_export(folder: str | Path, config) -> dict | None:
    """The structured-pruning state (``StructuredState.to_dict()`` form: phase ``"shrunk"`` and the
    ticket) of a compact export of a shrunk model, rebuilt from the kept heads / FFN neurons its
    sparsity.json lists per layer; None when ``folder`` is no such export (no sparsity.json, a model
    of uniform sizes, no kept indices recorded) or the indices do not describe ``config`` (the
    folder's model config, per-layer sizes included)."""
    from dist_sparse.structure import Ticket

    path = Path(folder) / "sparsity.json"
    if config.is_uniform() or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        layers = [report["layers"][f"layer.{i}"] for i in range(config.num_hidden_layers)]
        ticket = Ticket(tuple(tuple(int(h) for h in e["kept_heads"]) for e in layers),
                        tuple(tuple(int(n) for n in e["kept_ffn_neurons"]) for e in layers))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    s = report.get("structured") or {}
    record = {"phase": "shrunk", "ticket": ticket.to_dict(),
              "ticket_step": s.get("ticket_step") if isinstance(s.get("ticket_step"), int) else None,
              "forced": bool(s.get("forced")), "detector": {},
              "config": s.get("config") if isinstance(s.get("config"), dict) else None}
    try:
        TrainedStructure(config, record).kept_units()  # the sizes must be the config's
    except ValueError:
        return None
    return record


__all__ = ["TrainedStructure", "compact_state_dict", "dense_state_dict", "fold", "shrunk_record_of_export",
           "uniform_config"]
