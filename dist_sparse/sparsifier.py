"""The stateful part of dynamic sparse training: prepare / step / state_dict / load_state_dict.

Everything that decides a mask is a pure function of values that are identical on every
data-parallel rank (the fp32 master weights after the optimizer step, seeded random scores keyed
by (seed, step, parameter)), with ties taken in a seeded order of the global index, so every rank
computes the same mask without receiving it; a checksum of every mask is compared across ranks
after each update to prove it. Between updates the masks are enforced for free: pruned gradients
are zeroed before the optimizer sees them, and with zero moments an Adam/LAMB step leaves a zero
weight at zero.

The parts, each with one job (DESIGN.md section 10):

- ``sparsity.layout``: where masks live and where decisions are made (ZeRO-1/2 whole shard masks,
  decided on the module weights or the fp32 master fragments; ZeRO-3 slices), the one place that
  touches ZeRO state (through ``distributed.zero``) and sends collectives;
- ``sparsity.patterns``: unstructured / block / N:M: counts, selection units, mask expansion;
- ``sparsity.methods``: static / GMP / SET / RigL as score rules: when to update, drop and grow
  scores, target densities;
- ``sparsity.update``: the one mask-update routine they share;
- this module: the masks, the schedule position and the history, and the calls a training step
  makes. ``sparsity.fake`` runs it in one process, on plain tensors, for unit tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.distributed import comm
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import ZeroAccess, on, ring_all_reduce_bytes
from dist_sparse.masks.checksum import pack_mask, unpack_mask
from dist_sparse.masks.density import erk_densities, uniform_densities
from dist_sparse.sparsity.layout import MaskDivergenceError, layout_for
from dist_sparse.sparsity.methods import method_class
from dist_sparse.sparsity.patterns import decision_count, pattern_for
from dist_sparse.sparsity.select import LOCAL
from dist_sparse.sparsity.targets import Target
from dist_sparse.sparsity.update import Decision, first_masks, updated_masks

log = logging.getLogger("dist_sparse.sparsity")

STATE_FORMAT = 1

__all__ = ["MaskDivergenceError", "Sparsifier", "UpdateStats", "bf16_all_reduce_bytes", "check_layout",
           "config_fingerprint",
           "final_densities", "section_changes"]


@dataclass
class UpdateStats:
    """What one mask update did and cost. The bytes are what this rank sends; a yardstick for
    them is ``bf16_all_reduce_bytes``: one bf16 all-reduce of the sparse weights."""

    step: int
    changed: int = 0          # weights whose mask bit flipped (over the logical weights)
    active: int = 0
    total: int = 0
    sync_bytes: int = 0       # bytes this rank sent to agree on the decision and verify it
    apply_bytes: int = 0      # bytes this rank sent to read what the decision needs from ZeRO and
    #                           to zero ZeRO's copies (RigL's whole gradient for N:M at ZeRO-1/2)
    per_layer_density: dict = field(default_factory=dict)


def bf16_all_reduce_bytes(numels: list[int], dp_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of the sparse weights (``numels``: of this
    rank's TP shards) in bf16 over ``dp_size`` ranks: 2 (p - 1) / p of N * 2 bytes. A dense
    data-parallel step sends this much for these weights' gradients; a mask update should send
    no more."""
    return ring_all_reduce_bytes(sum(numels) * 2, dp_size)


def section_changes(before: dict, now: dict) -> str:
    """``key: old -> new`` for every key of a config section that differs (for error messages)."""
    keys = sorted(set(before) | set(now), key=str)
    changed = [f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys
               if before.get(k) != now.get(k)]
    return ", ".join(changed) or "same keys, different fingerprint"


def config_fingerprint(cfg: SparsityConfig) -> str:
    """What a checkpoint's masks were made under; resuming under a different section is refused."""
    return hashlib.blake2b(json.dumps(cfg.model_dump(), sort_keys=True).encode(), digest_size=8).hexdigest()


def final_densities(cfg: SparsityConfig, targets: list[Target]) -> dict[str, float]:
    shapes = {t.name: t.full_shape for t in targets}
    density = 1.0 - cfg.sparsity
    return erk_densities(shapes, density) if cfg.distribution == "erk" else uniform_densities(shapes, density)


def check_layout(cfg: SparsityConfig, targets: list[Target], *, tp_size: int, dp_size: int, zero_stage: int,
                 max_steps: int) -> None:
    """Every check of a sparsity section against the model's (sharded) shapes and the run's length.

    Pure: the training run calls it before any process group exists, on targets planned from the
    model config (``sparsity.targets.plan_targets``), and the sparsifier again on the real ones.
    """
    pattern = pattern_for(cfg)
    final = final_densities(cfg, targets)
    for t in targets:
        pattern.check_shape(cfg, t, tp_size)
    if tp_size > 1:
        replicated = [t.name for t in targets if t.shard_dim is None]
        if replicated:
            raise ValueError(f"with tensor parallelism the sparse weights must be tensor-parallel Linear "
                             f"weights; {replicated[:3]} are replicated: remove them from sparsity.params")
    method_class(cfg.method)(cfg, max_steps, final).check(max_steps)
    counts = {t.name: decision_count(cfg, t, final[t.name], tp_size) for t in targets}
    pattern.check_final(cfg, targets, counts, dp_size, zero_stage)


def check_state_config(state: dict, cfg: SparsityConfig) -> None:
    """A sparsity state (``Sparsifier.state_dict``) of another format, or written under another
    ``"sparsity"`` section than ``cfg``, cannot be resumed: raise saying what changed."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError("the checkpoint's sparsity state has an unknown format")
    if state.get("fingerprint") != config_fingerprint(cfg):
        raise ValueError(f"the checkpoint was written under a different \"sparsity\" section "
                         f"({section_changes(state.get('config', {}), cfg.model_dump())}); resume with the same "
                         "section, or pass --sparsity-reset to keep the weights and start new masks")


def _packed_on_host(mask: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """A mask bit-packed where it lives, the packed bytes on the host (a checkpoint's form)."""
    packed, shape = pack_mask(mask)
    return packed.cpu(), shape


class Sparsifier:
    def __init__(self, cfg: SparsityConfig, targets: list[Target], zero: ZeroAccess, groups: ParallelGroups,
                 max_steps: int, *, collectives=comm):
        """``collectives``: ``distributed.comm``, or the fake of ``sparsity.fake`` in one process."""
        self.cfg = cfg
        self.targets = targets
        self.zero = zero
        self.groups = groups
        self.max_steps = max_steps
        check_layout(cfg, targets, tp_size=groups.tp_size, dp_size=zero.dp_size, zero_stage=zero.stage,
                     max_steps=max_steps)
        self.final_density = final_densities(cfg, targets)
        self.method = method_class(cfg.method)(cfg, max_steps, self.final_density)
        self.pattern = pattern_for(cfg)
        self.layout = layout_for(targets, zero, groups, collectives)
        self.masks: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self.history: list[dict] = []
        # Optimizer moments exist from the first optimizer step on (or in a checkpoint).
        self._optimizer_has_state = False
        self._grad_scores: dict[str, torch.Tensor] = {}
        self._bytes_mark = 0
        self._densities: dict[str, float] = {t.name: 1.0 for t in targets}

    # ------------------------------------------------------------------ a training step
    def prepare(self, draw: bool = True, optimizer_has_state: bool = False) -> None:
        """Start masking gradients and, with ``draw``, draw the first masks and zero what they
        prune everywhere (without: ``load_state_dict`` brings the masks of a checkpoint).

        ``optimizer_has_state``: the optimizer already holds moments (masks drawn on resumed
        weights, ``--sparsity-reset``): they are zeroed where the new masks prune.
        """
        self._optimizer_has_state = optimizer_has_state
        self.layout.refresh()
        self.layout.attach(self.masks)
        if not draw:
            return
        decision = Decision(self.cfg, self.layout, self.pattern, step=0)
        new = first_masks(self.method, decision)
        stats = UpdateStats(step=0, sync_bytes=decision.sync_bytes)
        self._install(new, stats)

    def before_step(self, step: int) -> None:
        """Call before the first forward of optimizer step ``step`` (1-based).

        On RigL's update steps the gradient hooks let the dense gradient through, so that ZeRO's
        own reduction averages it over the data-parallel ranks; ``mask_gradients`` reads it as
        the regrowth score and masks it before the optimizer sees it.
        """
        self.layout.dense_grad_step = self.method.dense_grad and self.is_update_step(step)

    def mask_gradients(self) -> None:
        """Call after the last backward of a step, before ``engine.step()``.

        ZeRO-3 zeroes pruned entries of this rank's reduced gradient partitions (ZeRO-1/2 did it
        in the gradient hook). On a RigL update step it first keeps |dense gradient| as the
        regrowth score and then masks the gradient (all stages); under ZeRO-1/2 each rank reads
        only its fragment of the reduced gradient, and the update decides on fragments.
        Neither waits for the device.
        """
        if self.layout.dense_grad_step:
            self._grad_scores = self.layout.dense_gradients(self.masks, self.pattern.whole_groups)
            self.layout.dense_grad_step = False
            return
        self.layout.mask_gradients(self.masks)

    def remove_hooks(self) -> None:
        self.layout.remove_hooks()

    def is_update_step(self, step: int) -> bool:
        return self.method.is_update_step(step)

    def step(self, step: int) -> UpdateStats | None:
        """Call after optimizer step ``step`` (1-based count of completed steps)."""
        self.step_count = step
        self._optimizer_has_state = True
        if not self.is_update_step(step):
            return None
        old = dict(self.masks)  # on the device; the install replaces the dict's entries
        decision = Decision(self.cfg, self.layout, self.pattern, step, self._grad_scores)
        try:
            new = updated_masks(self.method, decision, old)
        finally:
            self.layout.grad_fragments = False
        stats = UpdateStats(step=step, sync_bytes=decision.sync_bytes)
        self._install(new, stats, old)
        return stats

    # ----------------------------------------------------------------- install
    def _install(self, new: dict[str, torch.Tensor], stats: UpdateStats, old: dict | None = None) -> None:
        """Make ``new`` (held-form masks, on the host or the device) the masks, on the device of
        what they mask, and zero what they prune; then count and verify. Host reads: one for
        the counts, one for the verification, whatever the number of targets."""
        # Since the last install: includes RigL's dense-gradient read in mask_gradients.
        before = self._bytes_mark
        for t in self.targets:
            mask = on(new[t.name], self.layout.mask_device(t), torch.bool)
            assert tuple(mask.shape) == self.layout.mask_shape(t), (t.name, mask.shape, self.layout.mask_shape(t))
            self.masks[t.name] = mask
            self.layout.install(t, mask, moments=self._optimizer_has_state)
        stats.apply_bytes = self.zero.bytes_applied - before
        self._bytes_mark = self.zero.bytes_applied
        self._account(stats, old)
        if self.cfg.verify:
            stats.sync_bytes += self.verify()
        self.history.append({k: v for k, v in stats.__dict__.items() if k != "per_layer_density"})

    def _account(self, stats: UpdateStats, old) -> None:
        """Active counts per target and the flipped bits, counted on the device, summed over the
        holders of each weight in one all-reduce, read in one copy to the host."""
        masks = [self.masks[t.name] for t in self.targets]
        device = masks[0].device if masks else torch.device("cpu")
        counts = [m.sum(dtype=torch.int64) for m in masks]
        flipped = [(m != on(old[t.name], m.device)).sum(dtype=torch.int64) for m, t in zip(masks, self.targets)
                   ] if old is not None else []
        counts = torch.stack(counts + [torch.stack(flipped).sum() if flipped
                                       else torch.zeros((), dtype=torch.int64, device=device)])
        # Shards and slices of one weight live on several ranks: sum them for the logical totals.
        group = self.layout.holders_group
        if group is not LOCAL:
            self.layout.collectives.all_reduce_sum_(counts, group)
        values = counts.tolist()  # the one read
        for i, t in enumerate(self.targets):
            stats.per_layer_density[t.name] = values[i] / t.numel
            self._densities[t.name] = stats.per_layer_density[t.name]
            stats.active += values[i]
            stats.total += t.numel
        stats.changed = values[-1]

    def verify(self) -> int:
        """Compare every mask's fingerprint across data-parallel ranks; raise naming the first that differs.

        Returns the bytes sent (two int64 all-reduces per mask: the min and the max). Under ZeRO-3
        no two ranks hold the same mask bits; ``_account`` has summed the exact counts instead.
        """
        return self.layout.verify(self.masks)

    def shard_mask(self, name: str) -> torch.Tensor:
        """The whole TP-shard mask of a target (gathered over data-parallel ranks under ZeRO-3);
        for inspection, tests and export, not for training."""
        t = next(t for t in self.targets if t.name == name)
        return self.layout.shard_mask(t, self.masks[name])

    def logical_masks(self) -> dict[str, torch.Tensor]:
        """Every target's whole logical mask (its ``full_shape``), on every rank.

        The layout-independent form of the masks: what another engine of the same run (the
        model after a physical shrink) or another parallel layout starts from. Collective over
        the data-parallel group under ZeRO-3 and over the tensor-parallel group with TP.
        """
        out = {}
        for t in self.targets:
            shard = self.shard_mask(t.name)
            if self.groups.tp_size > 1 and t.shard_dim is not None:
                shard = self.layout.collectives.all_gather_cat(shard, self.groups.tp_group, t.shard_dim)
            out[t.name] = shard.reshape(t.full_shape)
        return out

    def install_logical_masks(self, masks: dict[str, torch.Tensor], step: int, history: list | None = None) -> None:
        """Take over whole logical masks decided elsewhere (``logical_masks`` of an earlier engine,
        cut to this model's shapes): each rank keeps its part and zeroes what they prune in
        weights and optimizer state. Call after ``prepare(draw=False)``; ``step`` is the number
        of optimizer steps done, ``history`` the updates made so far."""
        if set(masks) != {t.name for t in self.targets}:
            raise RuntimeError(f"masks for {sorted(set(masks) ^ {t.name for t in self.targets})[:4]} do not match "
                               "this model's sparse targets")
        self.layout.refresh()
        mine = {}
        for t in self.targets:
            full = masks[t.name].to(torch.bool).cpu()
            if tuple(full.shape) != tuple(t.full_shape):
                raise RuntimeError(f"mask of {t.name} has shape {tuple(full.shape)}, the weight {tuple(t.full_shape)}")
            mine[t.name] = self.layout.hold(t, t.slice_full(full))
        self.step_count = step
        self._optimizer_has_state = step > 0
        self.history = list(history or [])
        self._install(mine, UpdateStats(step=step))
        self.history.pop()  # taking masks over is not an update

    # -------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """This rank's masks (bit-packed) and the method's state; ``layout`` says which part of
        each logical weight the masks cover, so a reader can put the ranks' files together."""
        layout = {"zero_stage": self.zero.stage, "dp_rank": self.groups.dp_rank, "dp_size": self.groups.dp_size,
                  "tp_rank": self.groups.tp_rank, "tp_size": self.groups.tp_size,
                  "targets": {t.name: {"full_shape": list(t.full_shape), "shard_shape": list(t.shard_shape),
                                       "shard_dim": t.shard_dim, "shard_offset": t.shard_offset,
                                       "slice": self.layout.held_slice(t)}
                              for t in self.targets}}
        return {"format": STATE_FORMAT, "config": self.cfg.model_dump(), "fingerprint": config_fingerprint(self.cfg),
                "step": self.step_count, "max_steps": self.max_steps, "layout": layout,
                "masks": {n: _packed_on_host(m) for n, m in self.masks.items()}, "history": self.history}

    def load_logical_state(self, state: dict, masks: dict[str, torch.Tensor]) -> None:
        """Resume at another layout (DP size, TP degree, ZeRO stage): ``state`` is one rank's
        sparsifier state of the checkpoint (step, history and config are the same on every rank),
        ``masks`` the whole mask of every sparse weight (``checkpoint.logical_masks``). This rank
        keeps its part of each, as this layout holds it."""
        missing = sorted({t.name for t in self.targets} - set(masks))
        if missing:
            raise ValueError(f"the checkpoint's masks lack sparse targets of this model: {missing[:3]}")
        self.layout.refresh()
        local = {}
        for t in self.targets:
            full = masks[t.name]
            if tuple(full.shape) != tuple(t.full_shape):
                raise ValueError(f"the checkpoint's mask of {t.name} has shape {tuple(full.shape)}, the weight "
                                 f"{tuple(t.full_shape)}")
            local[t.name] = pack_mask(self.layout.hold(t, t.slice_full(full)).cpu())
        self.load_state_dict({**state, "masks": local})

    def densities(self) -> dict[str, float]:
        """Current density of every logical weight (from the last install)."""
        return dict(self._densities)

    def sparse_weights(self) -> list[tuple[int, float]]:
        """(numel, density) of every target, for FLOP counting."""
        return [(t.numel, self._densities[t.name]) for t in self.targets]

    def load_state_dict(self, state: dict) -> None:
        check_state_config(state, self.cfg)
        names = {t.name for t in self.targets}
        if set(state["masks"]) != names:
            raise ValueError("the checkpoint's masks are for other parameters than this model's sparse targets")
        restored = {}
        self.layout.refresh()
        for t in self.targets:
            packed, shape = state["masks"][t.name]
            if tuple(shape) != self.layout.mask_shape(t):
                raise ValueError(f"mask of {t.name} has shape {tuple(shape)}, this rank's part of the parameter "
                                 f"{self.layout.mask_shape(t)}: resume with the same ZeRO stage and parallel layout")
            restored[t.name] = unpack_mask(packed, tuple(shape))
        self.step_count = state["step"]
        self._optimizer_has_state = self.step_count > 0
        self.history = list(state.get("history", []))
        stats = UpdateStats(step=self.step_count)
        self._install(restored, stats)
        self.history.pop()  # re-installing is not an update
