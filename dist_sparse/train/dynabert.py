"""DynaBERT as a training component: every micro batch runs one forward/backward pass per
sub-network of the step's schedule (``Component.passes``), and the Trainer lets DeepSpeed see
only the last one as the accumulation boundary.

A pass selects its sub-network with gates, not by slicing weights: a 0/1 gate over this rank's
heads (on their context vectors) and over its FFN neurons (on their activations), and the list of
layers the encoder runs. A gated-off unit contributes exactly zero to the output and receives
exactly zero gradient, so the pass computes the sub-network's function and gradients; the
weights keep their shapes, which AutoTP's sharded layers and ZeRO-3's partitioned parameters
need. (The cost: a width-m pass computes every head and neuron of the layers it runs. Layers a
depth drops are skipped for real.) Gates are decided over the whole layer and sliced to this
rank's block, so every TP rank runs its share of the same sub-network; the schedule is a function
of (seed, step), so every rank runs the same passes (under ZeRO-3 a pass that skips a layer
skips that layer's parameter gathers on every rank alike, DeepSpeed issue #1888).

Order: the full model first, then the smaller sub-networks (DynaBERT's order). Under ZeRO-3 the
first backward of a step *copies* each parameter's gradient into its partition and later ones add
(DeepSpeed's ``micro_step_id``); a parameter the first backward does not reach (a dropped layer)
would add onto the previous step's gradient. Measured: with the smallest sub-network first, ZeRO-3's
losses left ZeRO-1's from the third step on; full model first, ZeRO-1, 2 and 3 agree to 1e-7.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dist_sparse.config import DynaBertConfig, RunConfig
from dist_sparse.dynabert.subnet import kept_layers, subnetwork_name, unit_gate, width_counts
from dist_sparse.train.components import Component

log = logging.getLogger("dist_sparse.dynabert")
FILE = "dynabert.json"                  # the section as the run trains it, in every checkpoint
REWIRING_FILE = "dynabert_rewiring.json"  # phase 1's importance and orders, in the run directory


def step_schedule(cfg: DynaBertConfig, seed: int, step: int) -> list[tuple[float, float]]:
    """The (width, depth) sub-networks of optimizer step ``step``, the full model first, then the
    others largest first: all of them, or a draw of ``subnetworks - 1`` others seeded by (seed, step),
    identical on every rank and on a resumed run."""
    every = cfg.schedule()
    if cfg.subnetworks == "all" or cfg.subnetworks == len(every):
        return every
    full, others = every[0], every[1:]
    digest = hashlib.sha256(f"dynabert:{seed}:{step}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    picked = sorted(torch.randperm(len(others), generator=g)[:cfg.subnetworks - 1].tolist())
    return [full] + [others[i] for i in picked]


class DynaBertComponent(Component):
    """Runs the step's sub-networks as passes. ``loss``: the Trainer's loss when it distils (a
    ``DistillationLoss``; each pass points its layer map at the teacher layers of the layers the
    pass keeps), else None; ``layer_map``: the full student's teacher layer per layer."""

    name = "dynabert"

    def __init__(self, cfg: DynaBertConfig, model_config, *, seed: int, tp_rank: int, tp_size: int,
                 loss: Any = None, layer_map: list[int] | None = None):
        self.cfg = cfg
        self.seed = seed
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.loss = loss
        self.layer_map = list(layer_map) if layer_map is not None else None
        self.set_model_config(model_config)
        self._schedule: list[tuple[float, float]] = []

    def set_model_config(self, model_config) -> None:
        self.model_config = model_config
        tp_dealt = model_config.unit_order_tp
        if tp_dealt is None:
            raise ValueError("DynaBERT needs a rewired model (config.unit_order_tp): rewire it first (phase 1)")
        H, inter = model_config.num_attention_heads, model_config.intermediate_size
        for w in self.cfg.width_mult:
            width_counts(w, H, inter, tp_dealt)  # raises, naming the usable multipliers
        for d in self.cfg.depth_mult:
            kept_layers(d, model_config.num_hidden_layers)
        if H % self.tp_size or inter % self.tp_size:
            raise ValueError(f"{H} heads / {inter} FFN neurons do not split over TP degree {self.tp_size}")
        self._gates: dict[tuple[float, str], torch.Tensor] = {}

    # -- the gates --------------------------------------------------------------------------

    def _local_gates(self, width: float, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if width == 1.0:
            return None
        key = (width, str(device))
        if key not in self._gates:
            cfg = self.model_config
            H, inter, tp = cfg.num_attention_heads, cfg.intermediate_size, cfg.unit_order_tp
            heads, neurons = width_counts(width, H, inter, tp)
            hs, ns = H // self.tp_size, inter // self.tp_size
            r = self.tp_rank
            self._gates[key] = (unit_gate(H, heads, tp)[r * hs:(r + 1) * hs].to(device),
                                unit_gate(inter, neurons, tp)[r * ns:(r + 1) * ns].to(device))
        return self._gates[key]

    @contextlib.contextmanager
    def subnetwork(self, module, width: float, depth: float):
        """Within the block ``module`` (the engine's model) computes sub-network (width, depth)."""
        layers = module.bert.encoder.layer
        device = next(iter(module.parameters())).device
        gates = self._local_gates(width, device)
        kept = kept_layers(depth, len(layers))
        saved_map = None
        try:
            for layer in layers:
                layer.attention.self.head_gate = None if gates is None else gates[0]
                layer.intermediate.neuron_gate = None if gates is None else gates[1]
            module.bert.encoder.active_layers = None if depth == 1.0 else kept
            if self.loss is not None and self.layer_map is not None:
                saved_map = self.loss.layer_map
                self.loss.layer_map = [self.layer_map[i] for i in kept] if self.layer_map else []
            yield
        finally:
            for layer in layers:
                layer.attention.self.head_gate = None
                layer.intermediate.neuron_gate = None
            module.bert.encoder.active_layers = None
            if saved_map is not None:
                self.loss.layer_map = saved_map

    # -- the hooks ----------------------------------------------------------------------------

    def on_step_begin(self, trainer, step: int) -> None:
        self._schedule = step_schedule(self.cfg, self.seed, step)

    def passes(self, trainer, step: int, micro: int) -> list:
        module = trainer.engine.module
        return [self.subnetwork(module, w, d) for w, d in self._schedule]

    def on_after_optimizer_step(self, trainer, step: int) -> dict[str, float] | None:
        return {"subnetworks": float(len(self._schedule))}

    def record(self) -> dict:
        """What checkpoints and the run directory keep of the section (``FILE``)."""
        return {"phase": self.cfg.phase, "config": self.cfg.model_dump(),
                "unit_order_tp": self.model_config.unit_order_tp,
                "subnetworks": [subnetwork_name(w, d) for w, d in self.cfg.schedule()]}


def check_resumed(tag_dir: Path, cfg: DynaBertConfig | None) -> None:
    """A resume must continue the same DynaBERT schedule (the section as the run started), and
    a DynaBERT run cannot continue without it."""
    path = Path(tag_dir) / FILE
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if cfg is None:
        if recorded is not None:
            raise ValueError("--resume: the run trained with a \"dynabert\" section; resume with it")
        return
    if recorded is None:
        raise ValueError(f"--resume: {tag_dir} has no {FILE}: the run did not train with a \"dynabert\" section; "
                         "resume without it")
    if recorded.get("config") != cfg.model_dump():
        raise ValueError(f"--resume: the \"dynabert\" section differs from the one the run started with "
                         f"({recorded.get('config')}); resume with that section")


def preflight(run_cfg: RunConfig, model_config, init: str) -> None:
    """Start-up checks of a new DynaBERT run, before any process group exists."""
    cfg = run_cfg.dynabert
    if cfg is None:
        return
    if cfg.phase == 1 and model_config.unit_order_tp is not None:
        raise ValueError(f"--init {init} is already rewired by a DynaBERT run: continue from it with "
                         "dynabert.phase 2, or start phase 1 from the dense model")
    if cfg.phase == 2 and model_config.unit_order_tp is None:
        raise ValueError(f"dynabert.phase 2 starts from a phase-1 run (its weights are rewired); --init {init} "
                         "was never rewired: run phase 1 first")
    if not model_config.is_uniform():
        raise ValueError(f"DynaBERT needs every layer at full size; --init {init} has per-layer sizes (a shrunk "
                         "model)")
    tp = model_config.unit_order_tp or run_cfg.tp_size
    for w in cfg.width_mult:
        width_counts(w, model_config.num_attention_heads, model_config.intermediate_size, tp)
    for d in cfg.depth_mult:
        kept_layers(d, model_config.num_hidden_layers)


def importance_batches(dataset, collate: Callable[[list], dict], batch_size: int, count: int) -> list[dict]:
    """The first ``count`` batches of ``dataset`` in order, the same on every rank."""
    out = []
    for b in range(count):
        rows = [dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))]
        if not rows:
            break
        out.append(collate(rows))
    return out


def rewire(model, run_cfg: RunConfig, batches: list[dict], run: Path, is_rank0: bool) -> dict:
    """Phase 1 of a new run: measure importance on ``batches`` with the model's own loss (the
    task's, or MLM), split over all ranks; rewire the whole (unsharded) model in place for this
    run's TP degree; check its function did not change; record it in RUN/dynabert_rewiring.json.
    A collective (every rank calls it, before the engine exists)."""
    from deepspeed.accelerator import get_accelerator

    from dist_sparse.distributed import comm
    from dist_sparse.dynabert import importance as imp
    from dist_sparse.folders import write_json_atomic

    tp = run_cfg.tp_size
    device = torch.device(get_accelerator().current_device_name())
    model.to(device)
    t0 = time.perf_counter()
    heads, neurons = imp.measure_importance(model, batches, imp.own_loss, rank=comm.rank(),
                                            world=comm.world_size(), gather=comm.all_gather_object)
    probe = {k: v.to(device) for k, v in batches[0].items()}
    model.eval()
    with torch.no_grad():
        before = _outputs(model, probe)
        head_orders, neuron_orders = imp.rewiring_orders(heads, neurons, tp)
        imp.rewire_model(model, head_orders, neuron_orders, tp)
        after = _outputs(model, probe)
    model.train()
    diff = float((after - before).abs().max())
    scale = max(float(before.abs().max()), 1.0)
    if diff > 1e-4 * scale:
        raise RuntimeError(f"rewiring changed the model's outputs by {diff:.3g} (of {scale:.3g}): a bug, not a setting")
    record = {"unit_order_tp": tp, "importance_batches": len(batches), "logits_max_abs_diff": diff,
              "head_orders": imp.as_lists(head_orders), "neuron_orders": imp.as_lists(neuron_orders),
              "head_importance": heads.tolist(), "neuron_importance": neurons.tolist()}
    if is_rank0:
        log.info("DynaBERT: importance from %d batches in %.1f s; heads and neurons rewired for TP degree %d; "
                 "outputs before/after differ by %.2g", len(batches), time.perf_counter() - t0, tp, diff)
        write_json_atomic(Path(run) / REWIRING_FILE, record)
    return record


def _outputs(model, batch: dict) -> torch.Tensor:
    out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return (out.logits if hasattr(out, "logits") else out.prediction_logits).float()


def evaluate_subnetworks(component: "DynaBertComponent", module, evaluate_one: Callable[[], dict]) -> dict[str, dict]:
    """``evaluate_one()`` under every sub-network of the schedule but the full model (a
    collective: every rank runs the same ones); by sub-network name."""
    out = {}
    for w, d in component.cfg.schedule()[1:]:
        with component.subnetwork(module, w, d):
            out[subnetwork_name(w, d)] = evaluate_one()
    return out


__all__ = ["DynaBertComponent", "FILE", "REWIRING_FILE", "check_resumed", "evaluate_subnetworks", "importance_batches",
           "preflight", "rewire", "step_schedule"]
