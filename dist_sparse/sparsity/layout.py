"""Where masks live and where mask decisions are made, for one rank: one interface, two layouts.

Masks are kept in one of two forms:

- ``ReplicatedLayout`` (ZeRO-1/2, and AutoTP's shards): every data-parallel rank keeps the whole
  mask of its TP shard. A gradient hook zeroes pruned gradients before ZeRO reduces them, and
  since every DP rank holds the same masks, ``verify`` compares their fingerprints.
- ``SliceLayout`` (ZeRO-3): a rank keeps the mask of its flat slice of each TP shard only; pruned
  gradients are zeroed in its reduced gradient partition (``mask_gradients``, between backward
  and the optimizer step), so no rank needs a whole mask and mask bits never cross the network.
  Each bit lives on exactly one rank: there is nothing to compare, and the exact active count
  per weight, summed over the ranks, is the check.

Decisions are made on *pieces*, a flat range ``[start, stop)`` of every TP shard with its fp32
values, which are identical wherever they are read:

- replicated, fp32 module weights: the whole shard, read from the module weight (the master);
- replicated, bf16/fp16 module weights: this rank's fragment of the fp32 master (bf16 values tie
  by the thousand and differ from ZeRO-3's fp32 scores). The ranks decide together over their
  fragments (``split``), and the decided bits are gathered once so that every rank holds whole
  masks again. Patterns that decide group by group (N:M) read the whole fp32 masters instead:
  the fragments of one weight need not lie on neighbouring ranks, so a cut group could not be
  completed from a neighbour;
- slices: the slice, decided together with the other slices (``split``); N:M groups cut by a
  slice boundary are completed from the neighbouring slices.

Every touch of ZeRO state goes through ``zero`` (``distributed.zero.ZeroAccess``, or the fake of
``sparsity.fake``), every collective through ``collectives`` (``distributed.comm``, or threads
standing in for ranks), with the process groups of ``groups``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_sparse.distributed.zero import LocalSlice
from dist_sparse.masks.checksum import mask_fingerprint
from dist_sparse.sparsity.select import LOCAL
from dist_sparse.sparsity.targets import Target


class MaskDivergenceError(RuntimeError):
    """Ranks that must hold the same mask hold different ones."""


@dataclass
class Pieces:
    """This rank's piece of every target for one decision; ``split``: the pieces of a weight are
    spread over the data-parallel group, whose ranks must therefore decide together."""

    parts: dict[str, LocalSlice]
    split: bool


class Layout:
    """The interface (see the module docstring); subclasses say where masks are held."""

    def __init__(self, targets: list[Target], zero, groups, collectives):
        self.targets = targets
        self.zero = zero
        self.groups = groups
        self.collectives = collectives
        self.dense_grad_step = False  # the gradient hooks let RigL's dense gradient through

    # -- where masks live --------------------------------------------------------------------
    def held_range(self, t: Target) -> tuple[int, int]:
        """The flat positions of ``t``'s TP shard whose mask this rank keeps."""
        raise NotImplementedError

    def mask_shape(self, t: Target) -> tuple:
        raise NotImplementedError

    def hold(self, t: Target, shard: torch.Tensor) -> torch.Tensor:
        """This rank's part, in the held form, of a tensor of the TP shard's shape."""
        raise NotImplementedError

    def shard_mask(self, t: Target, mask: torch.Tensor) -> torch.Tensor:
        """The whole TP-shard mask from the held one (a collective of the DP group for slices)."""
        raise NotImplementedError

    def install(self, t: Target, mask: torch.Tensor, moments: bool) -> None:
        """Zero what ``mask`` prunes wherever ZeRO keeps ``t`` (moments once the optimizer has them)."""
        raise NotImplementedError

    @property
    def holders_group(self):
        """The ranks whose held masks together make up the logical masks (to sum counts over)."""
        raise NotImplementedError

    def verify(self, masks: dict[str, torch.Tensor]) -> int:
        """Raise MaskDivergenceError where ranks that must agree do not; returns the bytes sent."""
        return 0

    def held_slice(self, t: Target) -> list[int] | None:
        """For the checkpoint: the flat slice of the shard the held mask covers (None: all of it)."""
        return None

    # -- gradients -----------------------------------------------------------------------------
    def attach(self, masks: dict[str, torch.Tensor]) -> None:
        """Start masking gradients with ``masks`` (the sparsifier's dict, read at every step)."""

    def remove_hooks(self) -> None:
        """Stop masking gradients in hooks."""

    def mask_gradients(self, masks: dict[str, torch.Tensor]) -> None:
        """Zero pruned gradients the hooks did not (call between backward and the optimizer step)."""

    def dense_gradient(self, t: Target, mask: torch.Tensor) -> torch.Tensor:
        """|reduced dense gradient| of the held elements, flat, on the host; masks the gradient
        the optimizer will read."""
        return self.zero.take_dense_grad(t.param, mask).abs()

    # -- where decisions are made --------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read where this rank's parts of the weights are (before masks are installed)."""

    def pieces(self, whole_groups: bool) -> Pieces:
        """This rank's pieces with their current fp32 values. ``whole_groups``: the pattern decides
        group by group, so the pieces must be whole shards or slices ordered by rank."""
        raise NotImplementedError

    def held_from_pieces(self, decided: dict[str, torch.Tensor], pieces: Pieces,
                         counter: list[int]) -> dict[str, torch.Tensor]:
        """Masks in the held form from decisions over ``pieces`` (``counter``: bytes received)."""
        raise NotImplementedError

    def piece_of_held(self, t: Target, held: torch.Tensor, piece: LocalSlice) -> torch.Tensor:
        """The flat part of a held-form tensor that ``piece`` covers."""
        start, _ = self.held_range(t)
        return held.flatten()[piece.start - start:piece.stop - start]

    def decision_group(self, split: bool, balance_global: bool):
        """The ranks that decide a weight together: those holding its pieces (DP when split), and
        its other TP shards when the decision is global over the logical weight."""
        tp = self.groups.tp_size > 1 and balance_global
        if split:
            return None if tp else self.groups.dp_group  # None: the world, DP x TP
        return self.groups.tp_group if tp else LOCAL


class ReplicatedLayout(Layout):
    """ZeRO-1/2: whole TP-shard masks on every DP rank (see the module docstring)."""

    def __init__(self, targets, zero, groups, collectives, fragments: bool):
        super().__init__(targets, zero, groups, collectives)
        self.fragments = fragments
        self._hooks = []

    def held_range(self, t):
        return 0, t.shard_numel

    def mask_shape(self, t):
        return tuple(t.shard_shape)

    def hold(self, t, shard):
        return shard.contiguous()

    def shard_mask(self, t, mask):
        return mask.cpu()

    def install(self, t, mask, moments):
        self.zero.apply_mask(t.param, mask.to(t.param.device), moments=moments)

    @property
    def holders_group(self):
        return self.groups.tp_group if self.groups.tp_size > 1 else LOCAL

    def verify(self, masks):
        if self.groups.dp_size == 1:
            return 0
        fp = torch.tensor([mask_fingerprint(masks[t.name]) for t in self.targets], dtype=torch.int64)
        lo, hi = self.collectives.all_reduce_min_max(fp, self.groups.dp_group)
        if not torch.equal(lo, hi):
            i = int(torch.nonzero(lo != hi)[0])
            raise MaskDivergenceError(f"mask of {self.targets[i].name} differs across data-parallel ranks "
                                      f"(rank {self.groups.global_rank} holds fingerprint {int(fp[i])}); "
                                      "training stopped")
        return 2 * fp.numel() * fp.element_size()

    def attach(self, masks):
        for t in self.targets:
            self._hooks.append(t.param.register_hook(self._grad_hook(masks, t.name)))

    def _grad_hook(self, masks, name):
        def hook(grad):
            if self.dense_grad_step:
                return grad  # RigL's update step: ZeRO reduces the dense gradient; masked after
            mask = masks[name]
            if mask.device != grad.device:
                mask = masks[name] = mask.to(grad.device)
            return grad.masked_fill(~mask.view(grad.shape), 0)
        return hook

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def pieces(self, whole_groups):
        if not self.fragments:
            return Pieces({t.name: self.zero.local_slice(t.param, t.shard_numel) for t in self.targets}, False)
        if whole_groups:
            # One fp32 all-reduce per weight; N:M updates are few (static once, GMP's schedule).
            return Pieces({t.name: LocalSlice(self.zero.full_fp32(t.param).flatten(), 0, t.shard_numel)
                           for t in self.targets}, False)
        return Pieces({t.name: self.zero.master_fragment(t.param, t.shard_numel) for t in self.targets}, True)

    def held_from_pieces(self, decided, pieces, counter):
        if not pieces.split:
            return {t.name: decided[t.name].view(t.shard_shape) for t in self.targets}
        # Fragments: each rank decided its own; 1 bit per weight makes every rank's masks whole.
        whole = self.zero.gather_shard_masks([(decided[t.name].cpu(), pieces.parts[t.name].start,
                                               pieces.parts[t.name].stop, tuple(t.shard_shape))
                                              for t in self.targets], counter)
        return dict(zip((t.name for t in self.targets), whole))


class SliceLayout(Layout):
    """ZeRO-3: masks and decisions on each rank's flat slices (see the module docstring)."""

    def __init__(self, targets, zero, groups, collectives):
        super().__init__(targets, zero, groups, collectives)
        self._slices: dict[str, LocalSlice] = {}
        self._device_masks: dict[str, torch.Tensor] = {}  # padded, on the device, per install

    def refresh(self):
        self._slices = {t.name: self.zero.local_slice(t.param, t.shard_numel) for t in self.targets}

    def held_range(self, t):
        s = self._slices[t.name]
        return s.start, s.stop

    def mask_shape(self, t):
        start, stop = self.held_range(t)
        return (stop - start,)

    def hold(self, t, shard):
        start, stop = self.held_range(t)
        return shard.flatten()[start:stop]

    def shard_mask(self, t, mask):
        start, stop = self.held_range(t)
        return self.zero.gather_shard_mask(mask, start, stop, t.shard_shape, [0])

    def install(self, t, mask, moments):
        self._device_masks.pop(t.name, None)
        self.zero.apply_local_mask(t.param, mask, moments=moments)

    @property
    def holders_group(self):
        return None  # every rank holds a different slice: sum over the world

    def held_slice(self, t):
        return list(self.held_range(t))

    def mask_gradients(self, masks):
        for t in self.targets:
            if t.name not in self._device_masks:
                self._device_masks[t.name] = self.zero.padded_local_mask(t.param, masks[t.name])
            self.zero.mask_local_grad(t.param, self._device_masks[t.name])

    def pieces(self, whole_groups):
        self.refresh()
        return Pieces(dict(self._slices), True)

    def held_from_pieces(self, decided, pieces, counter):
        return decided


def layout_for(targets: list[Target], zero, groups, collectives) -> Layout:
    """The layout of a run: slices under ZeRO-3; whole shard masks under ZeRO-1/2, decided on the
    fp32 master fragments when the module weights are low precision."""
    if zero.partitioned:
        return SliceLayout(targets, zero, groups, collectives)
    low_precision = any(t.param.dtype != torch.float32 for t in targets)
    return ReplicatedLayout(targets, zero, groups, collectives, fragments=low_precision)
