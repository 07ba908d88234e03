"""Mask patterns: what a decision selects, how many, and what a config may ask of a weight.

- ``Unstructured``: the units are weights. A decision is a top-k over this rank's pieces, taken
  together with the ranks holding the weight's other pieces (``select.distributed_topk``).
- ``Block``: the units are ``b x b`` blocks of the TP shard (blocks never straddle a shard). Their
  scores, sums of the weights' scores in float64 (exact for fp32 values in practice, so partial
  sums over slices add up to the very numbers a whole shard gives), form a grid that every
  data-parallel rank holds whole: only the TP shards of a weight decide together.
- ``NM``: every group of ``m`` consecutive inputs keeps its ``keep`` best. Groups are decided on
  their own, so a rank holding whole groups needs nobody; a ZeRO-3 slice can cut one group at
  each end, completed with the fewer than ``m`` scores the neighbouring slices send.

Every choice among equal scores follows the one seeded tie order (``masks.topk.tie_order``).
"""

from __future__ import annotations

import dataclasses

import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.masks.density import active_counts
from dist_sparse.masks.patterns import expand_block_mask, nm_halo, nm_slice_mask
from dist_sparse.masks.topk import tie_order, tie_order_bits
from dist_sparse.sparsity.select import LOCAL, Part, SelectStats, distributed_topk, keys_and_nans, \
    on_device
from dist_sparse.sparsity.targets import Target


def decision_count(cfg: SparsityConfig, t: Target, density: float, tp_size: int) -> int:
    """Active weights of a decision unit: the logical weight, or one shard under balance=shard."""
    if tp_size > 1 and cfg.balance == "shard" and t.shard_dim is not None:
        return active_counts({t.name: t.shard_shape}, {t.name: density})[t.name]
    return active_counts({t.name: t.full_shape}, {t.name: density})[t.name]


class Pattern:
    whole_groups = False
    """Decides group by group: pieces must be whole shards or slices ordered by rank."""
    first_by_magnitude = False
    """The first mask is by magnitude whatever ``init`` says."""

    def check_shape(self, cfg: SparsityConfig, t: Target, tp_size: int) -> None:
        """Raise ValueError if ``t``'s (sharded) shape cannot carry the pattern."""

    def check_final(self, cfg: SparsityConfig, targets: list[Target], final_counts: dict[str, int], dp_size: int,
                    zero_stage: int) -> None:
        """Raise ValueError if the final active counts, or the ZeRO layout, cannot take the pattern."""

    def units(self, cfg: SparsityConfig, t: Target, goal, tp_size: int) -> int:
        """What a decision keeps of ``t`` to reach ``goal`` (``methods.Goal``), in the pattern's units."""
        raise NotImplementedError

    def select(self, decision, scores: dict, eligible: dict, ks: dict,
               at_most: bool = False) -> dict[str, torch.Tensor]:
        """Per target, the mask over its piece of the ``ks`` best eligible units by ``scores``
        (``at_most``: fewer where fewer are eligible; ``decision.chosen`` says how many)."""
        raise NotImplementedError


def _topk(decision, parts: list[Part], ks: list[int], split: bool, at_most: bool) -> list[torch.Tensor]:
    sel = SelectStats()
    chosen = distributed_topk(parts, ks, group=decision.group(split), stats=sel,
                              collectives=decision.layout.collectives, at_most=at_most)
    decision.sync_bytes += sel.bytes
    decision.chosen = {t.name: k for t, k in zip(decision.targets, sel.chosen)}
    return chosen


class Unstructured(Pattern):
    def units(self, cfg, t, goal, tp_size):
        return decision_count(cfg, t, goal.densities[t.name], tp_size)

    def select(self, decision, scores, eligible, ks, at_most=False):
        parts = []
        for t in decision.targets:
            start = decision.pieces.parts[t.name].start
            device = decision.device(t)
            # Lazy keys: the selection computes a weight's scores when it reaches it (``scores``
            # may compute on access, see ``update.Decision``), one weight at a time where it can.
            parts.append(Part(lambda t=t, device=device: keys_and_nans(on_device(scores[t.name], device)),
                              on_device(eligible[t.name].flatten(), device),
                              lambda pos, t=t, start=start: t.global_index(pos + start), t.numel,
                              decision.salt(t)))
        chosen = _topk(decision, parts, [ks[t.name] for t in decision.targets], decision.pieces.split, at_most)
        return {t.name: c for t, c in zip(decision.targets, chosen)}


class Block(Pattern):
    def __init__(self, block: int):
        self.block = block

    def check_shape(self, cfg, t, tp_size):
        b = self.block
        if t.shard_shape[0] % b or t.shard_shape[1] % b:
            where = (f"its tensor-parallel shard of shape {tuple(t.shard_shape)} (blocks may not straddle a shard)"
                     if tp_size > 1 else f"its shape {tuple(t.shard_shape)}")
            raise ValueError(f"sparsity.block_size {b} does not divide {t.name}: {where}; pick a block size "
                             "that divides every sparse weight's dimensions")

    def check_final(self, cfg, targets, final_counts, dp_size, zero_stage):
        for t in targets:
            if final_counts[t.name] < self.block ** 2:
                raise ValueError(f"sparsity {cfg.sparsity} leaves {t.name} fewer than one {self.block}x{self.block} "
                                 f"block ({final_counts[t.name]} weights): lower the sparsity or the block size")

    def units(self, cfg, t, goal, tp_size):
        return decision_count(cfg, t, goal.densities[t.name], tp_size) // self.block ** 2

    def grid(self, t: Target) -> Target:
        """The block grid of ``t`` laid out as a target (its global index maps grid positions)."""
        b = self.block
        return dataclasses.replace(t, shard_shape=(t.shard_shape[0] // b, t.shard_shape[1] // b),
                                   full_shape=(t.full_shape[0] // b, t.full_shape[1] // b),
                                   shard_offset=t.shard_offset // b)

    def grid_sum(self, decision, t: Target, x: torch.Tensor) -> torch.Tensor:
        """Per-block sums of this rank's piece values ``x`` of ``t``, in float64, the piece placed
        into zeros of the shard's size (a partial grid when the pieces are split)."""
        b, (rows, cols) = self.block, t.shard_shape
        p = decision.pieces.parts[t.name]
        whole = torch.zeros(t.shard_numel, dtype=torch.float64, device=decision.device(t))
        whole[p.start:p.stop] = on_device(x.flatten(), whole.device)
        return whole.view(rows // b, b, cols // b, b).sum(dim=(1, 3))

    def whole_grids(self, decision, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        """The grids the same on every data-parallel rank: when the pieces are split, the partial
        grids of all weights summed over the DP group in one all-reduce of a device tensor (one
        float64 per block, 1/``block``^2 of the weights; float64 sums of fp32 values are exact
        in practice, so they add up to what a whole shard gives)."""
        if not (decision.pieces.split and decision.layout.groups.dp_size > 1):
            return grids
        flat = torch.cat([g.flatten() for g in grids])
        decision.layout.collectives.all_reduce_sum_(flat, decision.layout.groups.dp_group)
        decision.sync_bytes += flat.numel() * flat.element_size()
        return [f.view(g.shape) for f, g in zip(flat.split([g.numel() for g in grids]), grids)]

    def select(self, decision, scores, eligible, ks, at_most=False):
        targets = decision.targets
        # Scores are read weight by weight (each into its small grid); the grids of all weights,
        # of the scores and of the eligibility, are then summed over the ranks together.
        grids = self.whole_grids(decision, [self.grid_sum(decision, t, scores[t.name]) for t in targets]
                                 + [self.grid_sum(decision, t, eligible[t.name]) for t in targets])
        parts = []
        for t, sums, elig in zip(targets, grids[:len(targets)], grids[len(targets):]):
            grid = self.grid(t)
            keys, nans = keys_and_nans(sums)
            parts.append(Part(keys, (elig > 0).flatten(), grid.global_index, grid.numel,  # masks are block-aligned
                              decision.salt(t), nans))
        # Every DP rank holds the whole grid: only TP shards decide together.
        chosen = _topk(decision, parts, [ks[t.name] for t in targets], split=False, at_most=at_most)
        return {t.name: decision.cut(t, expand_block_mask(c.view(self.grid(t).shard_shape), self.block))
                for t, c in zip(targets, chosen)}


class NM(Pattern):
    whole_groups = True
    # (As since the first release: the first N:M mask keeps the largest weights of every group.)
    first_by_magnitude = True

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m

    def check_shape(self, cfg, t, tp_size):
        if t.shard_shape[1] % self.m:
            raise ValueError(f"sparsity N:M with m={self.m} does not divide the input dimension "
                             f"{t.shard_shape[1]} of {t.name}")

    def check_final(self, cfg, targets, final_counts, dp_size, zero_stage):
        n, m = self.n, self.m
        if abs((1 - n / m) - cfg.sparsity) > 1e-9:
            raise ValueError(f"sparsity.sparsity must be 1 - n/m = {1 - n / m:g} for N:M {n}:{m}")
        if zero_stage != 3:
            return
        # ZeRO-3 slices are completed from the two neighbouring slices only (``_halos``), so a
        # group may touch at most two ranks: every partition must hold at least m - 1 elements.
        for t in targets:
            part = -(-t.shard_numel // dp_size)
            if part < m - 1:
                raise ValueError(f"sparsity N:M {n}:{m} under ZeRO stage 3: {t.name} is split into partitions of "
                                 f"{part} elements over {dp_size} data-parallel ranks, fewer than m - 1 = {m - 1}; "
                                 "leave it dense (sparsity.exclude) or use ZeRO stage 1 or 2")

    def units(self, cfg, t, goal, tp_size):
        """Weights kept per group of ``m``: never fewer than ``n``."""
        return max(self.n, round(self.m * (1 - goal.sparsity)))

    def select(self, decision, scores, eligible, ks, at_most=False):
        keep = next(iter(ks.values()))
        assert all(k == keep for k in ks.values()), "every weight keeps the same count per group"
        layout, targets = decision.layout, decision.targets
        if keep >= self.m:  # early in GMP's schedule: nothing to prune yet
            return dict(eligible)
        # Only weights still active may stay: score the pruned ones below every active (|w| >= 0) one.
        flat = [torch.where(on_device(eligible[t.name], decision.device(t)),
                            on_device(scores[t.name], decision.device(t)), -1.0).flatten() for t in targets]
        # One read for all weights (summed over the holders: every rank learns of a NaN on any
        # rank before anyone raises, so no rank waits alone); the masks below then read nothing.
        nans = torch.stack([torch.isnan(x).sum() for x in flat]).sum().view(1)
        group = layout.holders_group
        if group is not LOCAL:
            layout.collectives.all_reduce_sum_(nans, group)
            decision.sync_bytes += nans.numel() * nans.element_size()
        nan_count = int(nans.tolist()[0])
        if nan_count:
            raise ValueError(f"mask scores contain NaN ({nan_count} values): diverged weights?")
        pieces = [decision.pieces.parts[t.name] for t in targets]
        halos = [nm_halo(p.start, p.stop, self.m) for p in pieces]
        befores, afters = self._halos(decision, flat, halos)
        out = {}
        for t, x, p, h, before, after in zip(targets, flat, pieces, halos, befores, afters):
            window = torch.arange(p.start - h.from_prev, p.stop + h.from_next, device=x.device)
            out[t.name] = nm_slice_mask(x, p.start, keep, self.m, before, after, self._tie_keys(decision, t, window),
                                        checked=True)
        return out

    def _tie_keys(self, decision, t: Target, window: torch.Tensor) -> torch.Tensor:
        """Of the shard positions ``window``: the seeded tie order of their global index."""
        return tie_order(t.global_index(window), decision.salt(t), tie_order_bits(t.numel))

    def _halos(self, decision, flat, halos):
        """The scores just outside every piece that complete the groups its ends cut, from the
        neighbouring slices: one message to each neighbour carries those of all weights."""
        if not decision.pieces.split:  # whole shards: no group is cut
            return ([x[:0] for x in flat],) * 2
        # Device tensors: point-to-point over NCCL on a GPU, nothing read by the host.
        to_prev = torch.cat([x[:h.to_prev] for x, h in zip(flat, halos)]).float()
        to_next = torch.cat([x[x.numel() - h.to_next:] for x, h in zip(flat, halos)]).float()
        layout = decision.layout
        from_prev, from_next = layout.collectives.exchange_with_neighbours(
            to_prev, to_next, sum(h.from_prev for h in halos), sum(h.from_next for h in halos), layout.groups.dp_group)
        decision.sync_bytes += (to_prev.numel() + to_next.numel()) * to_prev.element_size()
        return from_prev.split([h.from_prev for h in halos]), from_next.split([h.from_next for h in halos])


def pattern_for(cfg: SparsityConfig) -> Pattern:
    if cfg.pattern == "block":
        return Block(cfg.block_size)
    if cfg.pattern == "nm":
        return NM(cfg.n, cfg.m)
    return Unstructured()
