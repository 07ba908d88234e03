"""The stateful part of dynamic sparse training: prepare / step / state_dict / load_state_dict.

Everything that decides a mask is a pure function of values that are identical on every
data-parallel rank (the fp32 master weights after the optimizer step, seeded random scores keyed
by (seed, step, parameter)), with ties taken in a seeded order of the global index, so every rank
computes the same mask without receiving it. A checksum of every mask is compared across ranks after each update
to prove it. Between updates the masks are enforced for free: a gradient hook zeroes pruned
gradients before ZeRO reduces them, and with zero moments an Adam/LAMB step leaves a zero
weight at zero.

Under ZeRO-3 a rank holds a flat slice of every weight and keeps the mask of that slice only;
pruned gradients are zeroed in its reduced gradient partition (``mask_gradients``, called
between backward and the optimizer step), so no rank needs the whole mask and mask bits never
cross the network. Each mask bit then lives on exactly one rank, so there is nothing to compare;
the exact active count per weight, summed over the ranks, is what ``verify`` checks there.
N:M groups cut by a slice boundary are completed with the few scores of the neighbouring
slices (``_nm``).

Under ZeRO-1/2 with bf16 (or fp16) weights every rank keeps whole shard masks, but the fp32
masters exist only as fragments, one per rank's optimizer partition. Decisions are then made like
ZeRO-3's, on the fragments (count-only bisection over the data-parallel group), and the decided
bits are exchanged once so that every rank holds the whole masks (``_as_masks``); N:M reads the
whole fp32 masters instead. With fp32 weights the module weight is the master: no exchange.

The methods differ only in their score rules (``dist_sparse.algorithms``): static masks never
change; GMP shrinks the active set by magnitude on a cubic schedule; SET drops the smallest
active weights and regrows the same number at random; regrown weights start at zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import torch

from dist_sparse import algorithms
from dist_sparse.config import SparsityConfig
from dist_sparse.distributed import comm
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import ZeroAccess
from dist_sparse.masks.checksum import mask_fingerprint, pack_mask, unpack_mask
from dist_sparse.masks.density import active_counts, erk_densities, uniform_densities
from dist_sparse.masks.patterns import expand_block_mask, nm_halo, nm_mask, nm_slice_mask
from dist_sparse.masks.topk import random_scores, stable_seed, tie_order, tie_order_bits
from dist_sparse.schedules import drop_fraction, gmp_sparsity, is_update_step
from dist_sparse.sparsity.select import LOCAL, Part, SelectStats, distributed_topk, sortable_keys
from dist_sparse.sparsity.targets import Target

log = logging.getLogger("dist_sparse.sparsity")

STATE_FORMAT = 1


def _nans(scores: torch.Tensor) -> torch.Tensor:
    """NaN count as a device scalar: the selection reads it together with its other counts."""
    return torch.isnan(scores).sum()


class MaskDivergenceError(RuntimeError):
    """Ranks that must hold the same mask hold different ones."""


@dataclass
class UpdateStats:
    step: int
    changed: int = 0          # weights whose mask bit flipped (over the logical weights)
    active: int = 0
    total: int = 0
    sync_bytes: int = 0       # bytes this rank sent to agree on the decision and verify it
    apply_bytes: int = 0      # bytes spent zeroing ZeRO's copies (ZeRO-1/2 with bf16 modules)
    per_layer_density: dict = field(default_factory=dict)


def section_changes(before: dict, now: dict) -> str:
    """``key: old -> new`` for every key of a config section that differs (for error messages)."""
    keys = sorted(set(before) | set(now), key=str)
    changed = [f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys
               if before.get(k) != now.get(k)]
    return ", ".join(changed) or "same keys, different fingerprint"


def config_fingerprint(cfg: SparsityConfig) -> str:
    """What a checkpoint's masks were made under; resuming under a different section is refused."""
    return hashlib.blake2b(json.dumps(cfg.model_dump(), sort_keys=True).encode(), digest_size=8).hexdigest()


def _decision_count(cfg: SparsityConfig, t: Target, density: float, tp_size: int) -> int:
    """Active weights of a decision unit: the logical weight, or one shard under balance=shard."""
    if tp_size > 1 and cfg.balance == "shard" and t.shard_dim is not None:
        return active_counts({t.name: t.shard_shape}, {t.name: density})[t.name]
    return active_counts({t.name: t.full_shape}, {t.name: density})[t.name]


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
    rule = algorithms.get(cfg.method)
    for t in targets:
        if cfg.pattern == "block":
            b = cfg.block_size
            if t.shard_shape[0] % b or t.shard_shape[1] % b:
                where = (f"its tensor-parallel shard of shape {tuple(t.shard_shape)} (blocks may not straddle a "
                         "shard)" if tp_size > 1 else f"its shape {tuple(t.shard_shape)}")
                raise ValueError(f"sparsity.block_size {b} does not divide {t.name}: {where}; pick a block size "
                                 "that divides every sparse weight's dimensions")
        if cfg.pattern == "nm" and t.shard_shape[1] % cfg.m:
            raise ValueError(f"sparsity N:M with m={cfg.m} does not divide the input dimension "
                             f"{t.shard_shape[1]} of {t.name}")
    if tp_size > 1:
        replicated = [t.name for t in targets if t.shard_dim is None]
        if replicated:
            raise ValueError(f"with tensor parallelism the sparse weights must be tensor-parallel Linear "
                             f"weights; {replicated[:3]} are replicated: remove them from sparsity.params")
    start_step = int(cfg.start_fraction * max_steps)
    end_step = max(1, int(cfg.end_fraction * max_steps))
    if rule.kind != "fixed" and end_step <= start_step:
        raise ValueError(f"sparsity: start_fraction {cfg.start_fraction} and end_fraction {cfg.end_fraction} "
                         f"of {max_steps} steps round to the same step: widen them or train longer")
    if cfg.pattern == "block":
        final = final_densities(cfg, targets)
        for t in targets:
            count = _decision_count(cfg, t, final[t.name], tp_size)
            if count < cfg.block_size ** 2:
                raise ValueError(f"sparsity {cfg.sparsity} leaves {t.name} fewer than one {cfg.block_size}x"
                                 f"{cfg.block_size} block ({count} weights): lower the sparsity or the block size")
    if rule.kind == "regrow" and cfg.update_interval >= end_step:
        log.warning("sparsity.update_interval %d >= the last update step %d: masks will never change",
                    cfg.update_interval, end_step)
    if cfg.pattern == "nm" and abs((1 - cfg.n / cfg.m) - cfg.sparsity) > 1e-9:
        raise ValueError(f"sparsity.sparsity must be 1 - n/m = {1 - cfg.n / cfg.m:g} for N:M {cfg.n}:{cfg.m}")
    if zero_stage == 3 and cfg.pattern == "nm":
        # ZeRO-3 slices are completed from the two neighbouring slices only (``_nm``), so a
        # group may touch at most two ranks: every partition must hold at least m - 1 elements.
        for t in targets:
            part = -(-t.shard_numel // dp_size)
            if part < cfg.m - 1:
                raise ValueError(f"sparsity N:M {cfg.n}:{cfg.m} under ZeRO stage 3: {t.name} is split into "
                                 f"partitions of {part} elements over {dp_size} data-parallel ranks, "
                                 f"fewer than m - 1 = {cfg.m - 1}; leave it dense (sparsity.exclude) or use "
                                 "ZeRO stage 1 or 2")


class Sparsifier:
    def __init__(self, cfg: SparsityConfig, targets: list[Target], zero: ZeroAccess, groups: ParallelGroups,
                 max_steps: int):
        self.cfg = cfg
        self.targets = targets
        self.zero = zero
        self.groups = groups
        self.max_steps = max_steps
        self.rule = algorithms.get(cfg.method)
        self.start_step = int(cfg.start_fraction * max_steps)
        self.end_step = max(1, int(cfg.end_fraction * max_steps))
        self.final_density = final_densities(cfg, targets)
        self.masks: dict[str, torch.Tensor] = {}
        self.step_count = 0
        # Optimizer moments exist from the first optimizer step on (or in a checkpoint).
        self._optimizer_has_state = False
        self._dense_grad_step = False
        self._grad_scores: dict[str, torch.Tensor] = {}
        self._grid_bytes = 0
        self._bytes_mark = 0
        self._densities: dict[str, float] = {t.name: 1.0 for t in targets}
        self._device_masks: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        self._hooks = []
        self._tie_step = 0
        # Where masks live and where they are decided (see the module docstring): ZeRO-3 keeps
        # and decides slices; ZeRO-1/2 keep whole shard masks, decided on the fp32 master
        # fragments when the module weights are low precision (their bf16 values tie massively
        # and differ from ZeRO-3's fp32 scores), on the module weights (= the masters) in fp32.
        self._mask_sliced = zero.partitioned
        low_precision = any(t.param.dtype != torch.float32 for t in targets)
        self._fragments = not zero.partitioned and low_precision
        self._score_sliced = zero.partitioned or (self._fragments and cfg.pattern != "nm")
        self._check_layout()

    # ------------------------------------------------------------------ set-up
    def _check_layout(self) -> None:
        check_layout(self.cfg, self.targets, tp_size=self.groups.tp_size, dp_size=self.zero.dp_size,
                     zero_stage=self.zero.stage, max_steps=self.max_steps)

    def prepare(self, draw: bool = True, optimizer_has_state: bool = False) -> None:
        """Install the gradient hooks and, with ``draw``, draw the first masks and zero what they
        prune everywhere (without: ``load_state_dict`` brings the masks of a checkpoint).

        ``optimizer_has_state``: the optimizer already holds moments (masks drawn on resumed
        weights, ``--sparsity-reset``): they are zeroed where the new masks prune.
        """
        stats = UpdateStats(step=0)
        self._optimizer_has_state = optimizer_has_state
        self._slices = self._local_slices()
        if not self._mask_sliced:
            for t in self.targets:
                self._hooks.append(t.param.register_hook(self._grad_hook(t.name)))
        if not draw:
            return
        if self.rule.starts_dense:
            new = {t.name: torch.ones(self._mask_shape(t), dtype=torch.bool) for t in self.targets}
        else:
            new = self._initial_masks(stats)
        self._install(new, stats)

    def before_step(self, step: int) -> None:
        """Call before the first forward of optimizer step ``step`` (1-based).

        On RigL's update steps the gradient hooks let the dense gradient through, so that ZeRO's
        own reduction averages it over the data-parallel ranks; ``mask_gradients`` reads it as
        the regrowth score and masks it before the optimizer sees it.
        """
        self._dense_grad_step = self.rule.grow == "gradient" and self.is_update_step(step)

    def mask_gradients(self) -> None:
        """Call after the last backward of a step, before ``engine.step()``.

        ZeRO-3 zeroes pruned entries of this rank's reduced gradient partition (ZeRO-1/2 did it
        in the gradient hook). On a RigL update step it first keeps |dense gradient| as the
        regrowth score and then masks the gradient (all stages).
        """
        if self._dense_grad_step:
            self._grad_scores = {t.name: self.zero.take_dense_grad(t.param, self.masks[t.name]).abs()
                                 for t in self.targets}
            if not self._mask_sliced:  # ZeRO-1/2 read the whole gradient: the score layout's part of it
                self._grad_scores = {t.name: self._score_view(t, g.view(t.shard_shape)) for t, g in
                                     zip(self.targets, self._grad_scores.values())}
            self._dense_grad_step = False
            return
        if self.zero.partitioned:
            for t in self.targets:
                if t.name not in self._device_masks:  # padded and on the device once per mask install
                    self._device_masks[t.name] = self.zero.padded_local_mask(t.param, self.masks[t.name])
                self.zero.mask_local_grad(t.param, self._device_masks[t.name])

    def _grad_hook(self, name):
        def hook(grad):
            if self._dense_grad_step:
                return grad  # RigL's update step: ZeRO reduces the dense gradient; masked after
            mask = self.masks[name]
            if mask.device != grad.device:
                mask = self.masks[name] = mask.to(grad.device)
            return grad.masked_fill(~mask.view(grad.shape), 0)
        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --------------------------------------------------------------- decisions
    def _decision_group(self):
        """Ranks whose slices make up one logical weight (they must decide together)."""
        tp = self.groups.tp_size > 1 and self.cfg.balance == "global"
        # Block grids are summed over the DP group first, so every DP rank holds the whole grid.
        if self._score_sliced and self.cfg.pattern != "block":
            return None if tp else self.groups.dp_group  # ZeRO-3: DP slices (and TP shards)
        return self.groups.tp_group if tp else LOCAL

    def _count(self, t: Target, density: float) -> int:
        """Active weights of this decision unit: the logical weight, or one shard under balance=shard."""
        return _decision_count(self.cfg, t, density, self.groups.tp_size)

    def _topk(self, parts: list[Part], ks: list[int], stats: UpdateStats) -> list[torch.Tensor]:
        sel = SelectStats()
        masks = distributed_topk(parts, ks, group=self._decision_group(), stats=sel)
        stats.sync_bytes += sel.bytes + self._grid_bytes
        self._grid_bytes = 0
        return masks

    def _unit(self, t: Target, scores_shard: torch.Tensor, eligible_shard: torch.Tensor):
        """(keys, eligible, global index fn, numel) of a target's local elements for selection.

        Unstructured: elements are weights; block: elements are blocks of the shard's grid.
        ``scores_shard`` / ``eligible_shard`` have the shard shape (or, under ZeRO-3, are the
        flat local slice).
        """
        if self.cfg.pattern == "block":
            b = self.cfg.block_size
            bs = self._grid_sum(t, scores_shard)
            elig = self._grid_sum(t, eligible_shard.to(torch.float64)) > 0  # masks are block-aligned
            gshape = (t.full_shape[0] // b, t.full_shape[1] // b)
            sshape = bs.shape
            off = t.shard_offset // b

            def gidx(pos):
                r, c = pos // sshape[1], pos % sshape[1]
                if t.shard_dim == 0:
                    r = r + off
                elif t.shard_dim == 1:
                    c = c + off
                return r * gshape[1] + c
            return Part(sortable_keys(bs).flatten(), elig.flatten(), *self._ties(t, gidx, gshape[0] * gshape[1]),
                        _nans(bs))
        if self._score_sliced:
            start = self._slices[t.name].start
            return Part(sortable_keys(scores_shard), eligible_shard,
                        *self._ties(t, lambda pos: t.global_index(pos + start), t.numel), _nans(scores_shard))
        return Part(sortable_keys(scores_shard).flatten(), eligible_shard.flatten(),
                    *self._ties(t, t.global_index, t.numel), _nans(scores_shard))

    def _ties(self, t: Target, global_index, numel: int):
        """(tie-order key function, key range) of a selection unit: elements tied at the threshold
        are taken in a seeded order of their global index, keyed by (seed, update step, weight),
        the same on every rank and layout (``masks.topk.tie_order``)."""
        bits = tie_order_bits(numel)
        salt = stable_seed(self.cfg.seed, self._tie_step, t.index)
        return (lambda pos: tie_order(global_index(pos), salt, bits)), 1 << bits

    def _grid_sum(self, t: Target, x: torch.Tensor) -> torch.Tensor:
        """Per-block sums of ``x`` over this rank's TP shard, the same on every data-parallel rank.

        Sums are taken in float64, where adding a block's fp32 values is exact in practice, so
        ZeRO-3 (partial sums of each slice, then a sum over the DP group: one float64 per block,
        1/``block_size``^2 of the weight) gets the very numbers ZeRO-1/2 gets from the whole shard.
        """
        b = self.cfg.block_size
        rows, cols = t.shard_shape
        if not self._score_sliced:
            return x.to(torch.float64).view(rows // b, b, cols // b, b).sum(dim=(1, 3))
        s = self._slices[t.name]
        pos = torch.arange(s.start, s.stop)
        block = (pos // cols // b) * (cols // b) + (pos % cols) // b
        grid = torch.zeros((rows // b) * (cols // b), dtype=torch.float64)
        grid.index_add_(0, block, x.flatten().to("cpu", torch.float64))
        if self.groups.dp_size > 1:
            comm.all_reduce_sum_(grid, self.groups.dp_group)
            self._grid_bytes += grid.numel() * grid.element_size()
        return grid.view(rows // b, cols // b)

    def _to_mask(self, t: Target, selected: torch.Tensor, counter: list[int]) -> torch.Tensor:
        if self.cfg.pattern == "block":
            b = self.cfg.block_size
            grid = selected.view(t.shard_shape[0] // b, t.shard_shape[1] // b)
            return self._score_view(t, expand_block_mask(grid, b))
        if self._score_sliced:
            return selected  # the flat local slice
        return selected.view(t.shard_shape)

    def _score_view(self, t: Target, full_or_shard: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a shard-shaped tensor, laid out as its scores are (the flat
        slice or fragment when decisions are made on slices)."""
        if self._score_sliced:
            s = self._slices[t.name]
            return full_or_shard.flatten()[s.start:s.stop]
        return full_or_shard

    def _local_slices(self) -> dict:
        if self._fragments:
            return {t.name: self.zero.master_fragment(t.param, t.shard_numel) for t in self.targets}
        return {t.name: self.zero.local_slice(t.param, t.shard_numel) for t in self.targets}

    def _as_masks(self, decided: dict[str, torch.Tensor], counter: list[int]) -> dict[str, torch.Tensor]:
        """Masks in the layout they are kept in, from decisions in the score layout: ZeRO-1/2 with
        low-precision weights decide on master fragments and keep whole shard masks, so the
        fragments' bits are gathered over the data-parallel group (1 bit per weight)."""
        if not self._score_sliced or self._mask_sliced:
            return decided
        whole = self.zero.gather_shard_masks([(decided[t.name].cpu(), self._slices[t.name].start,
                                               self._slices[t.name].stop, tuple(t.shard_shape)) for t in self.targets],
                                             counter)
        return {t.name: m for t, m in zip(self.targets, whole)}

    def _read(self) -> dict[str, torch.Tensor]:
        """|w| of the local elements, read from fp32 values that are identical on every rank."""
        self._slices = self._local_slices()
        out = {}
        for t in self.targets:
            if self._fragments and not self._score_sliced:
                # N:M on low-precision ZeRO-1/2: groups need whole rows, read from the fp32 masters
                # (one fp32 all-reduce per weight; N:M updates are few: static once, GMP's schedule)
                out[t.name] = self.zero.full_fp32(t.param).view(t.shard_shape).abs()
                continue
            v = self._slices[t.name].values
            out[t.name] = v.abs() if self._score_sliced else v.abs().view(t.shard_shape)
        return out

    def _random(self, t: Target, step: int) -> torch.Tensor:
        return self._score_view(t, t.slice_full(random_scores(t.full_shape, self.cfg.seed, step, t.index)))

    def _select(self, scores: dict[str, torch.Tensor], eligible: dict[str, torch.Tensor], ks: dict[str, int],
                stats: UpdateStats, counter: list[int]) -> dict[str, torch.Tensor]:
        names = [t.name for t in self.targets]
        parts = [self._unit(t, scores[t.name], eligible[t.name]) for t in self.targets]
        chosen = self._topk(parts, [ks[n] for n in names], stats)
        return {t.name: self._to_mask(t, c, counter) for t, c in zip(self.targets, chosen)}

    def _units_of(self, t: Target, count: int) -> int:
        return count // (self.cfg.block_size ** 2) if self.cfg.pattern == "block" else count

    def _nm(self, scores: dict[str, torch.Tensor], keep: int, stats: UpdateStats) -> dict[str, torch.Tensor]:
        """N:M masks keeping the ``keep`` largest scores of every group of ``m`` along the input dim.

        Each group is decided on its own, so a rank holding whole groups needs nobody. Under
        ZeRO-1/2 a rank holds whole shards (``m`` divides a shard's row). A ZeRO-3 flat slice
        can cut one group at each end; the fewer than ``m`` scores per end and weight that
        complete them come from the neighbouring slices, and the masks are then bit for bit those
        of ZeRO-1/2 on the same weights.
        """
        m = self.cfg.m
        group = self._holders_group()
        if group is not LOCAL:
            # Every rank learns of a NaN on any rank before anyone raises, so no rank waits alone.
            nans = torch.stack([torch.isnan(scores[t.name]).sum() for t in self.targets]).sum().view(1).cpu()
            comm.all_reduce_sum_(nans, group)
            stats.sync_bytes += nans.numel() * nans.element_size()
            if int(nans):
                raise ValueError(f"mask scores contain NaN ({int(nans)} values): diverged weights?")
        if not self.zero.partitioned:
            return {t.name: nm_mask(scores[t.name], keep, m) for t in self.targets}
        halos = [nm_halo(self._slices[t.name].start, self._slices[t.name].stop, m) for t in self.targets]
        flat = [scores[t.name].flatten() for t in self.targets]
        # One message to each neighbour carries the boundary scores of all weights, in target order.
        to_prev = torch.cat([x[:h.to_prev] for x, h in zip(flat, halos)]).float().cpu()
        to_next = torch.cat([x[x.numel() - h.to_next:] for x, h in zip(flat, halos)]).float().cpu()
        from_prev, from_next = comm.exchange_with_neighbours(
            to_prev, to_next, sum(h.from_prev for h in halos), sum(h.from_next for h in halos), self.groups.dp_group)
        stats.sync_bytes += (to_prev.numel() + to_next.numel()) * to_prev.element_size()
        befores = from_prev.split([h.from_prev for h in halos])
        afters = from_next.split([h.from_next for h in halos])
        return {t.name: nm_slice_mask(x, self._slices[t.name].start, keep, m, b, a)
                for t, x, b, a in zip(self.targets, flat, befores, afters)}

    def _initial_masks(self, stats: UpdateStats) -> dict[str, torch.Tensor]:
        self._tie_step = 0
        if self.cfg.pattern == "nm":
            return self._nm(self._read(), self.cfg.n, stats)
        if self.cfg.init == "magnitude":
            scores = self._read()
        else:
            self._slices = self._local_slices()
            scores = {t.name: self._random(t, 0) for t in self.targets}
        eligible = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        ks = {t.name: self._units_of(t, self._count(t, self.final_density[t.name])) for t in self.targets}
        counter = [0]
        masks = self._as_masks(self._select(scores, eligible, ks, stats, counter), counter)
        stats.sync_bytes += counter[0]
        return masks

    # ------------------------------------------------------------------ update
    def is_update_step(self, step: int) -> bool:
        if self.rule.kind == "fixed":
            return False
        if self.rule.kind == "gmp":
            # GMP prunes at grid steps from start_step through end_step, and at end_step itself so
            # that the target is reached even when the grid does not land on it.
            return step == self.end_step or is_update_step(step, self.cfg.update_interval, self.end_step + 1,
                                                           max(0, self.start_step - 1))
        return is_update_step(step, self.cfg.update_interval, self.end_step, self.start_step)

    def step(self, step: int) -> UpdateStats | None:
        """Call after optimizer step ``step`` (1-based count of completed steps)."""
        self.step_count = step
        self._optimizer_has_state = True
        if not self.is_update_step(step):
            return None
        stats = UpdateStats(step=step)
        self._tie_step = step
        mags = self._read()
        counter = [0]
        old = {n: m.cpu() for n, m in self.masks.items()}
        # eligible elements in the score layout (whole shard masks under ZeRO-1/2 are cut to fragments)
        active = old if self._mask_sliced else {t.name: self._score_view(t, old[t.name]) for t in self.targets}
        if self.rule.kind == "gmp":
            s_t = gmp_sparsity(step, self.cfg.sparsity, self.start_step, self.end_step, self.cfg.update_interval)
            if self.cfg.pattern == "nm":
                keep = max(self.cfg.n, round(self.cfg.m * (1 - s_t)))
                if keep >= self.cfg.m:  # early in the schedule: nothing to prune yet
                    new = old
                else:
                    # Only weights still active may stay: score the pruned ones below every active one.
                    scores = {t.name: torch.where(active[t.name].to(mags[t.name].device), mags[t.name], -1.0)
                              for t in self.targets}
                    new = self._nm(scores, keep, stats)
            else:
                frac = s_t / self.cfg.sparsity if self.cfg.sparsity > 0 else 0.0
                ks = {t.name: self._units_of(t, self._count(t, 1.0 - (1.0 - self.final_density[t.name]) * frac))
                      for t in self.targets}
                new = self._as_masks(self._select(mags, active, ks, stats, counter), counter)
        else:  # set: drop the weakest active weights, regrow as many at random
            f = drop_fraction(step, self.cfg.drop_fraction, self.cfg.drop_schedule, self.end_step)
            ks_total = {t.name: self._units_of(t, self._count(t, self.final_density[t.name])) for t in self.targets}
            drops = {n: int(f * k) for n, k in ks_total.items()}
            kept = self._select(mags, active, {n: ks_total[n] - drops[n] for n in ks_total}, stats, counter)
            grow_scores = {t.name: self._grow_scores(t, step) for t in self.targets}
            not_kept = {n: ~m for n, m in kept.items()}
            grown = self._select(grow_scores, not_kept, drops, stats, counter)
            # kept follows the magnitudes (the GPU), grown its scores (random draws on the host,
            # or the gradient read); _install keeps masks on the host anyway.
            new = self._as_masks({n: kept[n].cpu() | grown[n].cpu() for n in kept}, counter)
        stats.sync_bytes += counter[0]
        self._install(new, stats, old)
        return stats

    def _grow_scores(self, t: Target, step: int) -> torch.Tensor:
        if self.rule.grow == "gradient":
            return self._grad_scores.pop(t.name)
        return self._random(t, step)

    # ----------------------------------------------------------------- install
    def _install(self, new: dict[str, torch.Tensor], stats: UpdateStats, old: dict | None = None) -> None:
        # Since the last install: includes RigL's dense-gradient read in mask_gradients.
        before = self._bytes_mark
        for t in self.targets:
            mask = new[t.name].to(torch.bool).cpu()
            assert tuple(mask.shape) == self._mask_shape(t), (t.name, mask.shape, self._mask_shape(t))
            self.masks[t.name] = mask
            self._device_masks.pop(t.name, None)
            if self._mask_sliced:
                self.zero.apply_local_mask(t.param, mask, moments=self._optimizer_has_state)
            else:
                self.zero.apply_mask(t.param, mask.to(t.param.device), moments=self._optimizer_has_state)
        stats.apply_bytes = self.zero.bytes_applied - before
        self._bytes_mark = self.zero.bytes_applied
        self._account(stats, old)
        if self.cfg.verify:
            stats.sync_bytes += self.verify()
        self.history.append({k: v for k, v in stats.__dict__.items() if k != "per_layer_density"})

    def _mask_shape(self, t: Target) -> tuple:
        if self._mask_sliced:
            s = self._slices[t.name]
            return (s.stop - s.start,)
        return tuple(t.shard_shape)

    def _holders_group(self):
        """The ranks whose masks together make up the logical masks (for totals)."""
        if self._mask_sliced:
            return None  # every rank holds a different slice: sum over the world
        return self.groups.tp_group if self.groups.tp_size > 1 else LOCAL

    def _account(self, stats: UpdateStats, old) -> None:
        counts = torch.zeros(len(self.targets) * 2 + 1, dtype=torch.int64)
        for i, t in enumerate(self.targets):
            counts[2 * i] = int(self.masks[t.name].sum())
            if old is not None:
                counts[-1] += int((self.masks[t.name] != old[t.name]).sum())
        # Shards and slices of one weight live on several ranks: sum them for the logical totals.
        group = self._holders_group()
        if group is not LOCAL:
            comm.all_reduce_sum_(counts, group)
        for i, t in enumerate(self.targets):
            stats.per_layer_density[t.name] = int(counts[2 * i]) / t.numel
            self._densities[t.name] = stats.per_layer_density[t.name]
            stats.active += int(counts[2 * i])
            stats.total += t.numel
        stats.changed = int(counts[-1])

    def verify(self) -> int:
        """Compare every mask's fingerprint across data-parallel ranks; raise naming the first that differs.

        Returns the bytes sent (two int64 all-reduces per mask: the min and the max). Under ZeRO-3
        no two ranks hold the same mask bits; ``_account`` has summed the exact counts instead.
        """
        if self.groups.dp_size == 1 or self._mask_sliced:
            return 0
        fp = torch.tensor([mask_fingerprint(self.masks[t.name]) for t in self.targets], dtype=torch.int64)
        lo, hi = comm.all_reduce_min_max(fp, self.groups.dp_group)
        if not torch.equal(lo, hi):
            i = int(torch.nonzero(lo != hi)[0])
            raise MaskDivergenceError(f"mask of {self.targets[i].name} differs across data-parallel ranks "
                                      f"(rank {self.groups.global_rank} holds fingerprint {int(fp[i])}); "
                                      "training stopped")
        return 2 * fp.numel() * fp.element_size()

    def shard_mask(self, name: str) -> torch.Tensor:
        """The whole TP-shard mask of a target (gathered over data-parallel ranks under ZeRO-3);
        for inspection, tests and export, not for training."""
        t = next(t for t in self.targets if t.name == name)
        if not self._mask_sliced:
            return self.masks[name].cpu()
        s = self._slices[name]
        return self.zero.gather_shard_mask(self.masks[name], s.start, s.stop, t.shard_shape, [0])

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
                shard = comm.all_gather_cat(shard, self.groups.tp_group, t.shard_dim)
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
        self._slices = self._local_slices()
        mine = {}
        for t in self.targets:
            full = masks[t.name].to(torch.bool).cpu()
            if tuple(full.shape) != tuple(t.full_shape):
                raise RuntimeError(f"mask of {t.name} has shape {tuple(full.shape)}, the weight {tuple(t.full_shape)}")
            shard = t.slice_full(full)
            mine[t.name] = shard.flatten()[self._slices[t.name].start:self._slices[t.name].stop] \
                if self._mask_sliced else shard.contiguous()
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
                                       "slice": ([self._slices[t.name].start, self._slices[t.name].stop]
                                                 if self._mask_sliced else None)}
                              for t in self.targets}}
        return {"format": STATE_FORMAT, "config": self.cfg.model_dump(), "fingerprint": config_fingerprint(self.cfg),
                "step": self.step_count, "max_steps": self.max_steps, "layout": layout,
                "masks": {n: pack_mask(m.cpu()) for n, m in self.masks.items()}, "history": self.history}

    def densities(self) -> dict[str, float]:
        """Current density of every logical weight (from the last install)."""
        return dict(self._densities)

    def sparse_weights(self) -> list[tuple[int, float]]:
        """(numel, density) of every target, for FLOP counting."""
        return [(t.numel, self._densities[t.name]) for t in self.targets]

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError("the checkpoint's sparsity state has an unknown format")
        if state["fingerprint"] != config_fingerprint(self.cfg):
            raise ValueError(f"the checkpoint was written under a different \"sparsity\" section "
                             f"({section_changes(state.get('config', {}), self.cfg.model_dump())}); resume with the "
                             "same section, or pass --sparsity-reset to keep the weights and start new masks")
        names = {t.name for t in self.targets}
        if set(state["masks"]) != names:
            raise ValueError("the checkpoint's masks are for other parameters than this model's sparse targets")
        restored = {}
        self._slices = self._local_slices()
        for t in self.targets:
            packed, shape = state["masks"][t.name]
            if tuple(shape) != self._mask_shape(t):
                raise ValueError(f"mask of {t.name} has shape {tuple(shape)}, this rank's part of the parameter "
                                 f"{self._mask_shape(t)}: resume with the same ZeRO stage and parallel layout")
            restored[t.name] = unpack_mask(packed, tuple(shape))
        self.step_count = state["step"]
        self._optimizer_has_state = self.step_count > 0
        self.history = list(state.get("history", []))
        stats = UpdateStats(step=self.step_count)
        self._install(restored, stats)
        self.history.pop()  # re-installing is not an update
