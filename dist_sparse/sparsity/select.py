"""Top-k over a tensor whose elements are spread across ranks, by exchanging counts only.

A mask decision ("keep the k largest scores of this weight") must be the same function of the
*whole* logical weight whatever the layout: one rank holding it all (ZeRO-1/2), tensor-parallel
shards (AutoTP), or flat ZeRO-3 partitions of those shards. Gathering the scores would cost a
whole tensor per weight; instead every holder counts how many of its elements lie above a
candidate threshold, the counts are summed over the holders, and the threshold is bisected:
first over the 32-bit order-preserving key of the float score, then, for elements tied at the
k-th key, over their global flat index (lower index wins, as in ``masks.topk``). All layers are
bisected together, so one update costs about 66 all-reduces of one int64 per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dist_sparse.distributed import comm

KEY_MIN, KEY_MAX = -(2**31), 2**31 - 1
# Group value for a decision this rank makes alone (it holds the whole weight).
LOCAL = "local"


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the same order as the float32 scores (IEEE-754 bit trick).

    Positive floats already order like their bit patterns; negative ones order in reverse, so
    their magnitude bits are flipped. ``+ 0.0`` turns -0.0 into +0.0 so the two tie.
    """
    s = scores.detach().float().contiguous() + 0.0
    s = torch.nan_to_num(s, nan=float("-inf"))  # NaNs are reported by distributed_topk, on every rank
    bits = s.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@dataclass
class Part:
    """This rank's share of one logical tensor's selection problem.

    ``keys``: sortable keys of the local elements (1-D). ``eligible``: which of them may be
    chosen. ``global_index``: maps local positions (1-D LongTensor) to their flat index in the
    logical tensor; only called on the few elements tied at the k-th key.
    """

    keys: torch.Tensor
    eligible: torch.Tensor
    global_index: Callable[[torch.Tensor], torch.Tensor]
    numel_global: int
    nan_count: int = 0

    def __post_init__(self):
        self.eligible = self.eligible.to(self.keys.device)


@dataclass
class SelectStats:
    allreduces: int = 0
    bytes: int = 0


def _sum_counts(counts: list[int] | torch.Tensor, group, stats: SelectStats) -> torch.Tensor:
    t = torch.as_tensor(counts, dtype=torch.int64).clone()
    if group is not LOCAL and comm.world_size(group) > 1:
        comm.all_reduce_sum_(t, group)
        stats.allreduces += 1
        stats.bytes += t.numel() * t.element_size()
    return t


def distributed_topk(parts: list[Part], ks: list[int], group, stats: SelectStats | None = None) -> list[torch.Tensor]:
    """Boolean masks over each part's local elements: the global top-``k`` of every tensor.

    Every rank of ``group`` must call this with parts of the same tensors in the same order and
    the same ``ks``. ``k`` may not exceed the number of eligible elements over the group.
    """
    stats = stats if stats is not None else SelectStats()
    n = len(parts)
    if n == 0:
        return []
    ks_t = torch.as_tensor(ks, dtype=torch.int64)
    # Every rank learns of a NaN on any rank before anyone raises, so no rank waits alone.
    nans = _sum_counts([p.nan_count for p in parts], group, stats)
    if bool((nans > 0).any()):
        raise ValueError(f"mask scores contain NaN ({int(nans.sum())} values): diverged weights or gradients?")
    eligible_total = _sum_counts([int(p.eligible.sum()) for p in parts], group, stats)
    if bool((ks_t > eligible_total).any()) or bool((ks_t < 0).any()):
        bad = int(torch.nonzero((ks_t > eligible_total) | (ks_t < 0))[0])
        raise ValueError(f"cannot select {ks[bad]} of {int(eligible_total[bad])} eligible elements")

    # Phase 1: the largest key v with count(key >= v) >= k (the k-th largest key).
    lo = torch.full((n,), KEY_MIN, dtype=torch.int64)
    hi = torch.full((n,), KEY_MAX, dtype=torch.int64)
    while bool((lo < hi).any()):
        mid = (lo + hi + 1) // 2
        counts = _sum_counts([int((p.eligible & (p.keys >= int(m))).sum()) for p, m in zip(parts, mid)], group, stats)
        ok = counts >= ks_t
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid - 1)
    kth = lo
    above = _sum_counts([int((p.eligible & (p.keys > int(v))).sum()) for p, v in zip(parts, kth)], group, stats)
    need = ks_t - above  # how many of the elements tied at the k-th key are taken, lowest index first

    # Phase 2: among elements tied at the k-th key, the smallest index bound t with
    # count(index <= t) >= need.
    tied_pos = [torch.nonzero(p.eligible & (p.keys == int(v))).flatten() for p, v in zip(parts, kth)]
    tied_idx = [p.global_index(pos) for p, pos in zip(parts, tied_pos)]
    lo = torch.full((n,), -1, dtype=torch.int64)
    hi = torch.as_tensor([p.numel_global - 1 for p in parts], dtype=torch.int64)
    lo = torch.where(need > 0, torch.zeros_like(lo), lo)
    hi = torch.where(need > 0, hi, lo)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        counts = _sum_counts([int((idx <= int(m)).sum()) for idx, m in zip(tied_idx, mid)], group, stats)
        ok = counts >= need
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    bound = hi

    masks = []
    for p, v, b, pos, idx, k in zip(parts, kth, bound, tied_pos, tied_idx, ks):
        if k == 0:
            masks.append(torch.zeros_like(p.eligible))
            continue
        m = p.eligible & (p.keys > int(v))
        m[pos[idx <= int(b)]] = True
        masks.append(m)
    return masks
