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

import hashlib
from dataclasses import dataclass

import torch

from dist_sparse.distributed.zero import LocalSlice, on
from dist_sparse.sparsity.select import LOCAL
from dist_sparse.sparsity.targets import Target


class MaskDivergenceError(RuntimeError):
    """Ranks that must hold the same mask hold different ones."""


_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_MIX1, _MIX2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (products wrap modulo 2**64 on every device;
    the shifts are made logical by masking off the sign's copies)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _shape_key(shape: tuple) -> int:
    """A 64-bit key of a shape, the same in every process (``hash`` of a tuple is salted)."""
    digest = hashlib.blake2b(repr(shape).encode(), digest_size=8, person=b"dsparse.shape").digest()
    return _signed(int.from_bytes(digest, "little"))


def mask_fingerprints(masks: list[torch.Tensor]) -> torch.Tensor:
    """One int64 fingerprint per mask, computed where the masks are, without reading them.

    The fingerprint of a mask is the sum, modulo 2**64, of a 64-bit hash of every kept position
    mixed with its shape (sums modulo 2**64 do not depend on the order of the additions, so any
    device and any reduction order give the same value). Equal masks of equal shapes give equal
    fingerprints; a changed bit changes it by the hash of its position (a collision needs a set
    of flipped positions whose hashes cancel). The ranks all-reduce the min and the max of these
    and compare: a mismatch names a mask that differs.
    """
    out = []
    for mask in masks:
        shape_key = _shape_key(tuple(mask.shape))
        positions = torch.arange(mask.numel(), dtype=torch.int64, device=mask.device)
        hashed = _mix(positions * _GOLDEN + shape_key)
        out.append((hashed * mask.reshape(-1)).sum(dtype=torch.int64))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.int64)


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
        # RigL's gradient scores of this step cover fragments only: decide on fragments (ZeRO-1/2)
        self.grad_fragments = False

    # -- where masks live --------------------------------------------------------------------
    def held_range(self, t: Target) -> tuple[int, int]:
        """The flat positions of ``t``'s TP shard whose mask this rank keeps."""
        raise NotImplementedError

    def mask_shape(self, t: Target) -> tuple:
        raise NotImplementedError

    def mask_device(self, t: Target) -> torch.device:
        """Where the held mask of ``t`` lives: with the tensors it masks."""
        return t.param.device

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

    def dense_gradients(self, masks: dict[str, torch.Tensor], whole_groups: bool) -> dict[str, torch.Tensor]:
        """|reduced dense gradient| of every target where this rank decides, flat, on the device
        (held form, or the piece itself where ``grad_fragments`` is set); masks the gradient the
        optimizer will read. ``whole_groups``: the pattern decides on whole shards."""
        return {t.name: self.zero.take_dense_grad(t.param, masks[t.name]).abs() for t in self.targets}

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
        """The flat part of a held-form tensor that ``piece`` covers; a tensor of the piece's
        size is the piece already (RigL's fragment scores: a held tensor that size is the piece
        too, as it then covers the whole shard)."""
        if held.numel() == piece.stop - piece.start:
            return held.reshape(-1)
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
        # Per install: the pruned positions in the weight's shape on its device, so that the
        # gradient hook is one masked_fill with nothing to convert at every micro step.
        self._pruned: dict[str, torch.Tensor] = {}

    def held_range(self, t):
        return 0, t.shard_numel

    def mask_shape(self, t):
        return tuple(t.shard_shape)

    def hold(self, t, shard):
        return shard.contiguous()

    def shard_mask(self, t, mask):
        return mask.cpu()

    def install(self, t, mask, moments):
        mask = on(mask, t.param.device)
        self._pruned[t.name] = ~mask.view(t.param.shape)
        self.zero.apply_mask(t.param, mask, moments=moments)

    @property
    def holders_group(self):
        return self.groups.tp_group if self.groups.tp_size > 1 else LOCAL

    def verify(self, masks):
        if self.groups.dp_size == 1:
            return 0
        fp = mask_fingerprints([masks[t.name] for t in self.targets])
        lo, hi = self.collectives.all_reduce_min_max(fp, self.groups.dp_group)
        if not torch.equal(lo, hi):  # the one read of the device
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
            return grad.masked_fill(self._pruned[name], 0)
        return hook

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def dense_gradients(self, masks, whole_groups):
        if whole_groups:  # N:M decides on whole shards: the whole gradient (an all-reduce each)
            return super().dense_gradients(masks, whole_groups)
        # Each rank reads its fragment of the reduced gradient, and this update is decided on
        # the fragments (even of fp32 weights): no gradient crosses the network.
        self.grad_fragments = True
        return {t.name: self.zero.take_grad_fragment(t.param, masks[t.name]).values.abs() for t in self.targets}

    def pieces(self, whole_groups):
        if self.grad_fragments and not whole_groups:
            return Pieces({t.name: self.zero.master_fragment(t.param, t.shard_numel) for t in self.targets}, True)
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
        whole = self.zero.gather_shard_masks([(decided[t.name], pieces.parts[t.name].start,
                                               pieces.parts[t.name].stop, tuple(t.shard_shape))
                                              for t in self.targets], counter)
        return dict(zip((t.name for t in self.targets), whole))


class SliceLayout(Layout):
    """ZeRO-3: masks and decisions on each rank's flat slices (see the module docstring)."""

    def __init__(self, targets, zero, groups, collectives):
        super().__init__(targets, zero, groups, collectives)
        self._slices: dict[str, LocalSlice] = {}
        # Per install: the slice mask padded to the gradient partition, in its dtype, on its device.
        self._grad_masks: dict[str, torch.Tensor] = {}

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
        return self.zero.gather_shard_mask(mask, start, stop, t.shard_shape, [0]).cpu()

    def mask_device(self, t):
        return getattr(t.param, "ds_tensor", t.param).device

    def install(self, t, mask, moments):
        self._grad_masks[t.name] = self.zero.padded_local_mask(t.param, mask)
        self.zero.apply_local_mask(t.param, mask, moments=moments)

    @property
    def holders_group(self):
        return None  # every rank holds a different slice: sum over the world

    def held_slice(self, t):
        return list(self.held_range(t))

    def mask_gradients(self, masks):
        self.zero.mask_local_grads([t.param for t in self.targets], [self._grad_masks[t.name] for t in self.targets])

    def dense_gradients(self, masks, whole_groups):
        # All partitions read after one wait, the scores copied out, then one fused masking.
        params = [t.param for t in self.targets]
        scores = {}
        for t, grad in zip(self.targets, self.zero.local_grads(params)):
            if grad is None:
                raise RuntimeError(f"ZeRO-3 holds no gradient for the sparse weight {t.name}")
            scores[t.name] = grad.detach().reshape(-1)[: masks[t.name].numel()].float().abs()
        self.mask_gradients(masks)
        return scores

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
