"""Structured mask patterns: square blocks and N:M groups.

Weights are 2-D ``[out_features, in_features]`` (a ``torch.nn.Linear`` layout). Blocks tile
both dimensions; N:M groups run along the input dimension (the last), which is the layout
that sparse tensor cores accelerate (2:4 along the reduction dimension of ``x @ W.T``).
Selection inside a group uses the one deterministic order of ``topk``: larger score first,
equal scores by their tie keys (``topk.tie_order`` of the logical index, from the caller).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from dist_sparse.masks.topk import _as_scores, topk_rows_mask


def _check_2d(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D [out_features, in_features] tensor, got {shape}")


def _check_block(shape: tuple[int, ...], block: int, name: str) -> int:
    block = operator.index(block)
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    rows, cols = shape
    if rows % block or cols % block:
        raise ValueError(
            f"block={block} does not divide both dimensions of {name} with shape {tuple(shape)}; "
            f"pick a block size that divides {rows} and {cols}"
        )
    return block


def block_scores(scores_2d: torch.Tensor, block: int) -> torch.Tensor:
    """Score of every ``block x block`` tile: the sum of its elements' scores.

    Shape ``(rows // block, cols // block)``, float32 (float64 stays float64). The sum is
    neutral about the norm: pass ``|w|`` for an L1 block score or ``w**2`` for squared L2
    (which ranks blocks like the L2 norm), whichever the algorithm wants.
    """
    _check_2d(scores_2d, "scores_2d")
    block = _check_block(tuple(scores_2d.shape), block, "scores_2d")
    x = _as_scores(scores_2d, "scores_2d")
    rows, cols = x.shape
    return x.reshape(rows // block, block, cols // block, block).sum(dim=(1, 3))


def expand_block_mask(block_mask: torch.Tensor, block: int) -> torch.Tensor:
    """Element mask from a block mask: each entry becomes a ``block x block`` tile."""
    _check_2d(block_mask, "block_mask")
    block = operator.index(block)
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    return block_mask.to(torch.bool).repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)


def _check_nm(shape: tuple[int, ...], n: int, m: int, name: str) -> tuple[int, int]:
    n, m = operator.index(n), operator.index(m)
    if m < 2:
        raise ValueError(f"m={m} must be >= 2 (group size of the N:M pattern)")
    if not 1 <= n < m:
        raise ValueError(f"n={n} must be in [1, m) = [1, {m}) for an N:M pattern")
    if shape[-1] % m:
        raise ValueError(
            f"m={m} does not divide the input dimension {shape[-1]} of {name} with shape {tuple(shape)}"
        )
    return n, m


def nm_mask(scores_2d: torch.Tensor, n: int, m: int, tie_keys: torch.Tensor, checked: bool = False) -> torch.Tensor:
    """N:M mask: in every group of ``m`` consecutive inputs (last dim), the ``n`` largest scores.

    Equal scores go to the smaller ``tie_keys`` entry (same shape as the scores, distinct within
    a group). ``m`` must divide ``in_features`` and ``1 <= n < m``. ``checked``: the caller has
    already refused NaN scores (for all its weights with one read), so this reads nothing from
    the device.
    """
    _check_2d(scores_2d, "scores_2d")
    n, m = _check_nm(tuple(scores_2d.shape), n, m, "scores_2d")
    x = (scores_2d.to(torch.promote_types(scores_2d.dtype, torch.float32)) if checked
         else _as_scores(scores_2d, "scores_2d"))
    if tie_keys.shape != scores_2d.shape:
        raise ValueError(f"tie_keys of shape {tuple(tie_keys.shape)} do not match the scores {tuple(scores_2d.shape)}")
    # Each group of m is a row of the reshaped view (row-major order keeps a group contiguous).
    return topk_rows_mask(x.reshape(-1, m), n, tie_keys.reshape(-1, m)).reshape(scores_2d.shape)


@dataclass(frozen=True)
class NmHalo:
    """How many elements a flat slice ``[start, stop)`` exchanges with the neighbouring slices
    to complete the N:M groups that the slice boundaries cut.

    Groups are the aligned runs ``[g*m, (g+1)*m)`` of the flattened 2-D weight (``m`` divides a
    row, so a group never crosses a row). The slices of consecutive ranks tile the weight, so
    what one rank needs from its neighbour is exactly what the neighbour computes it must send;
    no sizes are exchanged. Assumes every slice except the last non-empty one holds at least
    ``m - 1`` elements, so a group touches at most two slices.
    """

    from_prev: int  # the first group starts this many elements before ``start``
    from_next: int  # the last group ends this many elements after ``stop``
    to_prev: int    # our first elements that complete the previous slice's last group
    to_next: int    # our last elements that complete the next slice's first group


def nm_halo(start: int, stop: int, m: int) -> NmHalo:
    """The boundary elements of the flat slice ``[start, stop)`` for groups of ``m``."""
    if stop <= start:  # an empty (trailing) slice takes part in no group
        return NmHalo(0, 0, 0, 0)
    # The previous slice ends at our start and the next one starts at our stop, so its needs
    # are ours mirrored.
    return NmHalo(from_prev=start % m, from_next=(-stop) % m, to_prev=(-start) % m, to_next=stop % m)


def nm_slice_mask(scores_flat: torch.Tensor, start: int, n: int, m: int,
                  before: torch.Tensor, after: torch.Tensor, tie_keys: torch.Tensor,
                  checked: bool = False) -> torch.Tensor:
    """The N:M mask of the flat slice starting at ``start`` of a weight, bit for bit the
    slice of ``nm_mask`` of the whole weight.

    ``before`` / ``after``: the scores of the ``nm_halo`` ``from_prev`` / ``from_next``
    elements just outside the slice (received from the neighbouring slices). With them every
    group the slice touches is whole, and each group is decided on its own. ``tie_keys``: those
    of the whole window, ``before`` + slice + ``after``. ``checked``: as for ``nm_mask``.
    """
    n, m = operator.index(n), operator.index(m)
    halo = nm_halo(start, start + scores_flat.numel(), m)
    if before.numel() != halo.from_prev or after.numel() != halo.from_next:
        raise ValueError(f"slice at {start} of {scores_flat.numel()} elements needs {halo.from_prev} scores "
                         f"before and {halo.from_next} after, got {before.numel()} and {after.numel()}")
    if scores_flat.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores_flat.device)
    whole = torch.cat([before.to(scores_flat), scores_flat.flatten(), after.to(scores_flat)])
    mask = nm_mask(whole.view(-1, m), n, m, tie_keys.view(-1, m), checked).flatten()
    return mask[halo.from_prev: halo.from_prev + scores_flat.numel()]


def check_nm(mask: torch.Tensor, n: int, m: int, exact: bool = True) -> bool:
    """Whether every group of ``m`` along the last dim holds exactly ``n`` True values.

    ``exact=False`` accepts at most ``n`` (what the hardware requires), for masks that also
    drop weights inside the pattern.
    """
    _check_2d(mask, "mask")
    n, m = _check_nm(tuple(mask.shape), n, m, "mask")
    per_group = mask.to(torch.bool).reshape(-1, m).sum(dim=-1)
    return bool((per_group == n).all()) if exact else bool((per_group <= n).all())


def check_block_aligned(mask: torch.Tensor, block: int) -> bool:
    """Whether every ``block x block`` tile of ``mask`` is all True or all False."""
    _check_2d(mask, "mask")
    block = _check_block(tuple(mask.shape), block, "mask")
    rows, cols = mask.shape
    per_block = mask.to(torch.bool).reshape(rows // block, block, cols // block, block).sum(dim=(1, 3))
    return bool(((per_block == 0) | (per_block == block * block)).all())
