"""One DynaBERT sub-network of a checkpoint as a standalone model: which ones a run trained, the
checks on ``--width/--depth``, the cut-out weights, the gated reference and what the export's
report and card say of it. ``dist-sparse inspect`` lists the same descriptions.

A DynaBERT fine-tuning run writes ``dynabert.json`` into every checkpoint (the section as the run
started: ``width_mult`` x ``depth_mult`` are the sub-networks it trained) and its model config
carries ``unit_order_tp`` (the weights are rewired, so width ``m`` is the ``m * H`` heads and
``m * I`` neurons of lowest importance rank: :mod:`dist_sparse.dynabert.subnet`). The cut-out
model is checked against the whole trained model with the sub-network's gates and active layers
set, which is how training computed it (``train.dynabert.DynaBertComponent.subnetwork``, here for
one unsharded model: TP rank 0 of 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_sparse.dynabert.subnet import (kept_layers, kept_units, subnetwork_name, subnetwork_state_dict, unit_gate,
                                         width_counts)
from dist_sparse.train.dynabert import FILE


def read_record(tag_dir: Path) -> dict | None:
    """The checkpoint's dynabert.json, or None when the run did not train with a "dynabert" section."""
    path = Path(tag_dir) / FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        trained(record)  # the multipliers are there and are numbers
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err!r})") from None
    return record


def trained(record: dict) -> list[tuple[float, float]]:
    """Every (width, depth) the run trained, largest first (the schedule's order)."""
    from dist_sparse.config import DynaBertConfig

    return DynaBertConfig(**record["config"]).schedule()


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes (built on the meta device: no memory; tied
    weights counted once)."""
    from dist_sparse.export.checkpoint import model_class

    with torch.device("meta"):
        model = model_class(config)(config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Subnetwork:
    """Sub-network (width, depth) of a rewired model ``full`` (its DistSparseBertConfig)."""

    full: object
    width: float
    depth: float

    @property
    def name(self) -> str:
        return subnetwork_name(self.width, self.depth)

    @property
    def layers(self) -> list[int]:
        return kept_layers(self.depth, self.full.num_hidden_layers)

    @property
    def counts(self) -> tuple[int, int]:
        """(heads, FFN neurons) every kept layer keeps."""
        c = self.full
        return width_counts(self.width, c.num_attention_heads, c.intermediate_size, c.unit_order_tp)

    def positions(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The kept heads' and neurons' positions in the (rewired) trained model, the same in every layer."""
        c, (heads, neurons) = self.full, self.counts
        return (kept_units(c.num_attention_heads, heads, c.unit_order_tp),
                kept_units(c.intermediate_size, neurons, c.unit_order_tp))

    def cut(self, weights: dict[str, torch.Tensor]) -> tuple[dict, object]:
        """(state dict, config) of the standalone sub-network; the config names the trained
        architecture again (the cut drops it, and it decides the model class)."""
        from dist_sparse.export.structured import fold

        sd, cfg = subnetwork_state_dict(fold(weights, self.full), self.full, self.width, self.depth)
        cfg.architectures = self.full.architectures
        return sd, cfg

    def config(self):
        return self.cut({})[1]

    def gate(self, model) -> None:
        """Make the whole trained ``model`` compute this sub-network (gates stay until reset)."""
        c, (heads, neurons) = self.full, self.counts
        full_width = self.width == 1.0
        for layer in model.bert.encoder.layer:
            layer.attention.self.head_gate = None if full_width else unit_gate(c.num_attention_heads, heads,
                                                                               c.unit_order_tp)
            layer.intermediate.neuron_gate = None if full_width else unit_gate(c.intermediate_size, neurons,
                                                                               c.unit_order_tp)
        model.bert.encoder.active_layers = None if self.depth == 1.0 else self.layers

    def describe(self) -> dict:
        """What sparsity.json says of the sub-network (beside its per-layer entries)."""
        c, (heads, neurons) = self.full, self.counts
        return {"name": self.name, "width": self.width, "depth": self.depth, "layers_kept": self.layers,
                "num_layers_trained": c.num_hidden_layers, "heads_per_layer": heads,
                "num_attention_heads": c.num_attention_heads, "ffn_per_layer": neurons,
                "intermediate_size": c.intermediate_size, "parameters": parameter_count(self.config()),
                "full_model_parameters": parameter_count(c), "unit_order_tp": c.unit_order_tp}

    def report_layers(self) -> dict:
        """sparsity.json's per-layer entries of the exported layers. ``kept_heads`` /
        ``kept_ffn_neurons`` are positions in the rewired trained model, as a shrunk model's are
        original indices, so a fine-tuning run started from a compact export finds them as its ticket."""
        c, (heads, neurons) = self.full, self.counts
        kept_h, kept_n = self.positions()
        return {f"layer.{j}": {"trained_layer": i, "heads": heads, "num_attention_heads": c.num_attention_heads,
                               "ffn": neurons, "intermediate_size": c.intermediate_size,
                               "kept_heads": list(kept_h), "kept_ffn_neurons": list(kept_n)}
                for j, i in enumerate(self.layers)}


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-9)


def check_format(width: float | None, fmt: str | None) -> None:
    """Refuse --format dense for a narrower sub-network (needs nothing from the checkpoint)."""
    if fmt == "dense" and width is not None and width < 1:
        raise ValueError(f"--format dense cannot hold the width-{width:g} sub-network: its layers keep fewer heads of "
                         "the same head size, which no stock BertConfig describes (its head size is hidden size / "
                         "head count); use --format compact (the default for width < 1)")


def select(tag_dir: Path, config, width: float | None, depth: float | None) -> Subnetwork:
    """The sub-network --width/--depth name (either one left out: 1.0), refused unless the
    checkpoint's run trained it."""
    record = read_record(tag_dir)
    if record is None and config.unit_order_tp is None:
        why = f"its model was never rewired (no unit_order_tp in its config) and it has no {FILE}"
    elif record is None:  # e.g. a plain fine-tuning run started from a DynaBERT run's model
        why = (f"it has no {FILE}: its run did not train with a \"dynabert\" section (its model was rewired by an "
               "earlier DynaBERT run: export a checkpoint of that run)")
    elif config.unit_order_tp is None:
        why = f"it has {FILE} but its model config has no unit_order_tp: the checkpoint is damaged"
    else:
        why = None
    if why is not None:
        raise ValueError(f"--width/--depth select a DynaBERT sub-network, but {tag_dir} is not a checkpoint of a "
                         f"DynaBERT run: {why}; export the whole model without --width/--depth")
    width = 1.0 if width is None else width
    depth = 1.0 if depth is None else depth
    pairs = trained(record)
    match = next(((w, d) for w, d in pairs if _same(w, width) and _same(d, depth)), None)
    if match is None:
        c = record["config"]
        raise ValueError(f"the run did not train the sub-network of width {width:g}, depth {depth:g}; trained: "
                         f"{', '.join(subnetwork_name(w, d) for w, d in pairs)} (width_mult {c['width_mult']} x "
                         f"depth_mult {c['depth_mult']})")
    return Subnetwork(config, *match)


def card_lines(d: dict) -> list[str]:
    """The model card's paragraph and table on the exported sub-network (``d``: sparsity.json's
    "dynabert", :meth:`Subnetwork.describe` and the run's phase)."""
    phase = f"phase {d['phase']} " if d.get("phase") is not None else ""
    lines = [f"DynaBERT sub-network `{d['name']}` (width {d['width']:g}, depth {d['depth']:g}) of a {phase}DynaBERT "
             f"run, cut out as a standalone model: it keeps layers {', '.join(map(str, d['layers_kept']))} of the "
             f"{d['num_layers_trained']} trained, each with {d['heads_per_layer']} of "
             f"{d['num_attention_heads']} attention heads and {d['ffn_per_layer']} of {d['intermediate_size']} FFN "
             f"neurons (the most important ones). Parameters: {d['parameters']:,} (the full trained model: "
             f"{d['full_model_parameters']:,}).", "",
             "| layer | trained layer | heads | FFN width |", "|---|---|---|---|"]
    for j, i in enumerate(d["layers_kept"]):
        lines.append(f"| {j} | {i} | {d['heads_per_layer']} of {d['num_attention_heads']} | "
                     f"{d['ffn_per_layer']} of {d['intermediate_size']} |")
    return lines + ["", "The kept heads' and neurons' positions in the trained (rewired) model are in sparsity.json.",
                    ""]


__all__ = ["Subnetwork", "card_lines", "check_format", "parameter_count", "read_record", "select", "trained"]
