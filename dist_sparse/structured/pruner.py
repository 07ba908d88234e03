"""The stateful side of EarlyBERT: coefficients on the model, their L1 penalty, the search.

Decide globally, slice locally: each rank holds the coefficients of its own heads and neurons
(AutoTP splits a layer's heads and neurons into contiguous equal blocks, one per TP rank), a
check gathers the magnitudes over the tensor-parallel group into whole-layer vectors, and the
keep-set is a pure function of those (``earlybird``), so it is the same on every rank and at any
TP degree. The values come from ZeRO's fp32 master copy, which is identical on all data-parallel
ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dist_sparse.config import StructuredPruningConfig
from dist_sparse.distributed import comm
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import ZeroAccess
from dist_sparse.structure import HEAD_COEF, NEURON_COEF, Ticket, layer_key
from dist_sparse.structured.earlybird import (EarlyBirdDetector, Observation, global_counts, keep_masks,
                                              layer_counts, round_to_multiple)

log = logging.getLogger("dist_sparse.structured")


def attach_coefficients(model: nn.Module, tp_size: int) -> None:
    """Give every attention layer one coefficient per head and every FFN one per neuron, all 1.

    Built before AutoTP shards the model, with the local sizes a TP rank will hold: every entry is
    1, so no rank needs to know which block is its own. Under tensor parallelism the coefficients
    are marked as sharded (``tensor_model_parallel``) so DeepSpeed's gradient norm counts every
    rank's block once.
    """
    config = model.config
    for i, layer in enumerate(model.bert.encoder.layer):
        heads, neurons = config.heads_of(i), config.intermediate_of(i)
        if heads % tp_size or neurons % tp_size:
            raise ValueError(f"layer {i}: {heads} heads / {neurons} FFN neurons do not split evenly over "
                             f"tensor-parallel degree {tp_size}")
        for module, n in ((layer.attention.self, heads // tp_size), (layer.intermediate, neurons // tp_size)):
            coef = nn.Parameter(torch.ones(n, dtype=next(model.parameters()).dtype))
            if tp_size > 1:
                coef.tensor_model_parallel = True
            module.slimming_coef = coef


def validate(cfg: StructuredPruningConfig, model_config, tp_size: int, run_cfg) -> None:
    """Start-up checks of a structured-pruning run, before any compute."""
    if run_cfg.zero_stage not in (1, 2, 3):
        raise ValueError("structured_pruning needs ZeRO stage 1, 2 or 3 (zero_optimization.stage)")
    zero = run_cfg.deepspeed.get("zero_optimization", {})
    for key in ("offload_param", "offload_optimizer"):
        dev = (zero.get(key) or {}).get("device", "none")
        if dev not in (None, "none"):
            raise ValueError(f"structured_pruning with zero_optimization.{key} is not supported: the physical "
                             "shrink rebuilds the engine from in-memory fp32 weights and moments; remove the offload")
    if run_cfg.deepspeed.get("fp16", {}).get("enabled"):
        raise ValueError("structured_pruning does not support fp16 (dynamic loss scaling would scale the L1 "
                         "subgradient differently from the loss gradient); use bf16")
    if "scheduler" in run_cfg.deepspeed:
        raise ValueError('structured_pruning continues the learning-rate schedule on the shrunk model\'s new engine, '
                         'which works with the "training" section\'s schedule only: remove the DeepSpeed "scheduler"')
    opt = str(run_cfg.deepspeed.get("optimizer", {}).get("type", "")).lower()
    if opt not in ("lamb", "adam", "adamw"):
        # The shrink carries Adam's two moments (exp_avg, exp_avg_sq), which LAMB keeps too.
        raise ValueError("structured_pruning carries the optimizer's Adam moments across the shrink: set "
                         f'optimizer.type to "Lamb", "Adam" or "AdamW" (got {opt or "nothing"!r})')
    heads = [model_config.heads_of(i) for i in range(model_config.num_hidden_layers)]
    neurons = [model_config.intermediate_of(i) for i in range(model_config.num_hidden_layers)]
    plan = PrunePlan(cfg, tp_size)
    for i, (h, n) in enumerate(zip(heads, neurons)):
        if h % tp_size:
            raise ValueError(f"layer {i} has {h} heads, not divisible by tensor_parallel.autotp_size {tp_size}")
        if n % plan.neuron_multiple:
            raise ValueError(f"layer {i}'s FFN width {n} is not a multiple of ffn_multiple x TP degree = "
                             f"{plan.neuron_multiple}; lower structured_pruning.ffn_multiple")
        # A ratio that rounds a layer down to nothing is refused rather than silently raised to
        # the minimum: the user asked for something the layer cannot give.
        if round_to_multiple(h * (1 - cfg.head_ratio), plan.head_multiple) == 0:
            raise ValueError(f"head_ratio {cfg.head_ratio} leaves no head in layer {i} ({h} heads, kept in "
                             f"multiples of the TP degree {tp_size}); lower head_ratio")
        if round_to_multiple(n * (1 - cfg.ffn_ratio), plan.neuron_multiple) == 0:
            raise ValueError(f"ffn_ratio {cfg.ffn_ratio} leaves no FFN neuron in layer {i} ({n} neurons, kept "
                             f"in multiples of {plan.neuron_multiple}); lower ffn_ratio or ffn_multiple")
    plan.head_counts(heads)  # raises if the minimum cannot be met
    plan.neuron_counts(neurons)


@dataclass(frozen=True)
class PrunePlan:
    """Rounding rules: heads in multiples of the TP degree, FFN widths in ffn_multiple x TP."""

    cfg: StructuredPruningConfig
    tp_size: int

    @property
    def head_multiple(self) -> int:
        return self.tp_size

    @property
    def neuron_multiple(self) -> int:
        return self.cfg.ffn_multiple * self.tp_size

    def head_counts(self, totals: list[int], scores: list[torch.Tensor] | None = None) -> list[int]:
        if self.cfg.scope == "global" and scores is not None:
            return global_counts(scores, self.cfg.head_ratio, self.head_multiple, self.cfg.min_heads)
        return layer_counts(totals, self.cfg.head_ratio, self.head_multiple, self.cfg.min_heads)

    def neuron_counts(self, totals: list[int], scores: list[torch.Tensor] | None = None) -> list[int]:
        if self.cfg.scope == "global" and scores is not None:
            return global_counts(scores, self.cfg.ffn_ratio, self.neuron_multiple, self.cfg.min_neurons)
        return layer_counts(totals, self.cfg.ffn_ratio, self.neuron_multiple, self.cfg.min_neurons)

    def decide(self, head_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor]):
        hc = self.head_counts([s.numel() for s in head_scores], head_scores)
        nc = self.neuron_counts([s.numel() for s in neuron_scores], neuron_scores)
        return keep_masks(head_scores, hc), keep_masks(neuron_scores, nc)


class StructuredPruner:
    """bind / check / state_dict around one training run.

    ``phase`` is "search" until the ticket is drawn and "shrunk" after the physical shrink; a run
    resumed after the shrink starts in "shrunk" and has no coefficients.
    """

    def __init__(self, cfg: StructuredPruningConfig, num_layers: int, groups: ParallelGroups, zero: ZeroAccess):
        self.cfg, self.groups, self.zero = cfg, groups, zero
        self.num_layers = num_layers
        self.plan = PrunePlan(cfg, groups.tp_size)
        self.detector = EarlyBirdDetector(cfg.window, cfg.epsilon, cfg.max_search_steps)
        self.ticket: Ticket | None = None
        self.ticket_step: int | None = None
        self.forced = False
        self.phase = "search"
        self._coefs: list[tuple[nn.Parameter, nn.Parameter]] = []

    @property
    def searching(self) -> bool:
        return self.phase == "search"

    # -- wiring -----------------------------------------------------------------------------

    def bind(self, module: nn.Module) -> None:
        """Find the coefficients in the engine's module (after an engine is built or replaced).

        The L1 penalty ``l1 * sum|c|`` is not applied here: LAMB adds its subgradient
        ``l1 * sign(c)`` to the coefficients' fp32 gradients in the optimizer step (their param
        groups carry ``l1``, see ``dist_sparse.optim``), the same at every ZeRO stage and exact
        in bf16 at any accumulation.
        """
        self._coefs = []
        if not self.searching:
            return
        params = dict(module.named_parameters())
        for i in range(self.num_layers):
            self._coefs.append((params[layer_key(i, HEAD_COEF)], params[layer_key(i, NEURON_COEF)]))

    # -- the search -------------------------------------------------------------------------

    def is_check_step(self, step: int) -> bool:
        return self.searching and (step % self.cfg.check_interval == 0 or step >= self.cfg.max_search_steps)

    def gather_scores(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """|coefficient| of every head and neuron, whole layers, on every rank (fp32 masters,
        then one all-gather over the TP group for all layers at once)."""
        local = [self.zero.full_fp32(p) for pair in self._coefs for p in pair]
        sizes = [t.numel() for t in local]
        flat = torch.cat(local).abs().cpu()
        everyone = flat[None]  # (tp, n_local); no TP group (None would mean the whole world) at tp=1
        if self.groups.tp_size > 1:
            everyone = comm.all_gather_cat(everyone, self.groups.tp_group, dim=0)
        heads, neurons = [], []
        for j, (start, n) in enumerate(zip(_offsets(sizes), sizes)):
            whole = everyone[:, start:start + n].reshape(-1)  # TP blocks in rank order
            (heads if j % 2 == 0 else neurons).append(whole)
        return heads, neurons

    def check(self, step: int) -> tuple[Observation, dict[str, float]]:
        """Read the keep-set, update the detector; draws the ticket when it says so."""
        head_scores, neuron_scores = self.gather_scores()
        heads, neurons = self.plan.decide(head_scores, neuron_scores)
        obs = self.detector.observe(step, heads, neurons)
        penalty = self.cfg.l1 * sum(float(s.sum()) for s in head_scores + neuron_scores)
        scalars = {"l1_penalty": penalty,
                   "coef_mean_abs/heads": float(torch.cat(head_scores).mean()),
                   "coef_mean_abs/neurons": float(torch.cat(neuron_scores).mean()),
                   "kept_heads": float(sum(int(h.sum()) for h in heads)),
                   "kept_neurons": float(sum(int(n.sum()) for n in neurons))}
        if obs.head_distance is not None:
            scalars["distance/heads"] = obs.head_distance
            scalars["distance/neurons"] = obs.neuron_distance
        if obs.drawn:
            self.ticket = Ticket.from_masks(heads, neurons)
            self.ticket_step = step
            self.forced = obs.forced
            if obs.forced:
                log.warning("structured pruning: no early-bird ticket by max_search_steps=%d (last distances %s); "
                            "drawing it from the current coefficients", self.cfg.max_search_steps,
                            [round(d, 4) for d in self.detector.distances])
        return obs, scalars

    def mark_shrunk(self) -> None:
        self._coefs = []
        self.phase = "shrunk"

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"phase": self.phase, "ticket": None if self.ticket is None else self.ticket.to_dict(),
                "ticket_step": self.ticket_step, "forced": self.forced, "detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.phase = state["phase"]
        self.ticket = None if state["ticket"] is None else Ticket.from_dict(state["ticket"])
        self.ticket_step = state["ticket_step"]
        self.forced = state["forced"]
        self.detector.load_state_dict(state["detector"])


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


__all__ = ["PrunePlan", "StructuredPruner", "attach_coefficients", "validate"]
