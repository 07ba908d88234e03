"""Top-k over a tensor whose elements are spread across ranks, by exchanging counts only.

A mask decision ("keep the k largest scores of this weight") must be the same function of the
*whole* logical weight whatever the layout: one rank holding it all (ZeRO-1/2), tensor-parallel
shards (AutoTP), or flat ZeRO-3 partitions of those shards. Gathering the scores would cost a
whole tensor per weight; instead every holder counts how many of its elements lie above a
candidate threshold, the counts are summed over the holders, and the threshold is bisected:
first over the 32-bit order-preserving key of the float score, then, for elements tied at the
k-th key, over their tie keys: ``masks.topk.tie_order`` of the global flat index, salted per
weight and update (the one tie rule of every mask decision; smaller key wins).

All tensors of one call are bisected together: a round counts every tensor (one reduction
kernel each, no host read), reads the count vector to the host once and all-reduces it once.
An update therefore costs about 32 + 1 + log2(largest numel) rounds (about 55 for BERT-large),
whatever the number of layers. A rank that holds whole tensors (``LOCAL``) does not bisect: it
selects the same elements directly from the k-th largest key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from dist_sparse.distributed import comm
from dist_sparse.masks.topk import tie_order, tie_order_bits

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
    logical tensor of ``numel_global`` elements; only called on the few elements tied at the
    k-th key. ``salt``: of their tie order (``stable_seed(seed, step, weight)``).
    """

    keys: torch.Tensor
    eligible: torch.Tensor
    global_index: Callable[[torch.Tensor], torch.Tensor]
    numel_global: int
    salt: int
    nan_count: int | torch.Tensor = 0  # a device scalar is read with the other counts, in one go

    def __post_init__(self):
        self.eligible = self.eligible.to(self.keys.device)

    @property
    def tie_bits(self) -> int:
        return tie_order_bits(self.numel_global)

    def tie_keys(self, pos: torch.Tensor) -> torch.Tensor:
        """Tie keys of local positions: a seeded permutation of [0, 2**tie_bits) of their global index."""
        return tie_order(self.global_index(pos), self.salt, self.tie_bits)


@dataclass
class SelectStats:
    allreduces: int = 0   # collectives sent (none for LOCAL or a group of one)
    bytes: int = 0        # their payload
    rounds: int = 0       # bisection rounds (each one count vector for all tensors)
    chosen: list = field(default_factory=list)  # the k selected of every tensor (after ``at_most``)
    # Device-to-host reads: one per round and one for the checks; plus, once per call, a few per
    # tensor (finding the elements tied at the k-th key, or LOCAL's direct selection).
    host_reads: int = 0


def _counts(per_part: list[torch.Tensor], group, stats: SelectStats, collectives) -> torch.Tensor:
    """Stack the per-tensor counts (device scalars), read them to the host once and sum them
    over ``group``: one int64 per tensor, one all-reduce for all tensors."""
    t = torch.stack(per_part).to(torch.int64).cpu()
    stats.host_reads += 1
    # Bookkeeping collectives run on CPU tensors (gloo next to NCCL, see comm.init).
    if group is not LOCAL and collectives.world_size(group) > 1:
        collectives.all_reduce_sum_(t, group)
        stats.allreduces += 1
        stats.bytes += t.numel() * t.element_size()
    return t


def _check(parts: list[Part], ks: torch.Tensor, group, stats: SelectStats, collectives,
           at_most: bool = False) -> torch.Tensor:
    """Raise, on every rank of the group alike, on NaN scores or a k beyond the eligible count
    (``at_most``: lower such a k to the eligible count instead). Returns the ks to select."""
    n = len(parts)
    device = parts[0].keys.device
    nan_counts = [torch.as_tensor(p.nan_count, dtype=torch.int64, device=device) for p in parts]
    head = _counts(nan_counts + [p.eligible.sum() for p in parts], group, stats, collectives)
    # Every rank learns of a NaN on any rank before anyone raises, so no rank waits alone.
    nans, eligible_total = head[:n], head[n:]
    if bool((nans > 0).any()):
        raise ValueError(f"mask scores contain NaN ({int(nans.sum())} values): diverged weights or gradients?")
    if at_most:
        ks = torch.minimum(ks, eligible_total)
    if bool((ks > eligible_total).any()) or bool((ks < 0).any()):
        bad = int(torch.nonzero((ks > eligible_total) | (ks < 0))[0])
        raise ValueError(f"cannot select {int(ks[bad])} of {int(eligible_total[bad])} eligible elements")
    return ks


def _select(p: Part, kth: int, tied_pos: torch.Tensor, tied_keys: torch.Tensor, bound: int) -> torch.Tensor:
    """Eligible keys above the k-th, plus the tied ones whose tie key is at most ``bound``."""
    m = p.eligible & (p.keys > kth)
    m[tied_pos[tied_keys <= bound]] = True
    return m


def _local_topk(p: Part, k: int) -> torch.Tensor:
    """The k largest eligible keys of a whole tensor, ties to the smaller tie key: exactly what
    the bisection finds (the k-th largest key; then the smallest tie keys among its ties)."""
    if k == 0:
        return torch.zeros_like(p.eligible)
    keys = torch.where(p.eligible, p.keys, KEY_MIN - 1)  # ineligible elements below every key
    # kthvalue counts from the smallest: the k-th largest is the (numel - k + 1)-th smallest. Its
    # value is unique whichever tied element the kernel returns.
    kth = int(torch.kthvalue(keys, keys.numel() - k + 1).values)
    need = k - int((keys > kth).sum())
    tied_pos = torch.nonzero(keys == kth).flatten()
    tied_keys = p.tie_keys(tied_pos)
    bound = int(tied_keys.sort().values[need - 1])
    return _select(p, kth, tied_pos, tied_keys, bound)


def distributed_topk(parts: list[Part], ks: list[int], group, stats: SelectStats | None = None,
                     collectives=None, at_most: bool = False) -> list[torch.Tensor]:
    """Boolean masks over each part's local elements: the global top-``k`` of every tensor.

    Every rank of ``group`` must call this with parts of the same tensors in the same order and
    the same ``ks``. ``k`` may not exceed the number of eligible elements over the group (with
    ``at_most`` it is lowered to that number; ``stats.chosen`` says what was selected). All
    parts lie on one device. ``collectives``: what sums the counts over ``group`` (default
    ``distributed.comm``; the one-process fake layout passes threads standing in for ranks).
    """
    stats = stats if stats is not None else SelectStats()
    collectives = collectives or comm
    n = len(parts)
    if n == 0:
        return []
    assert len({p.keys.device for p in parts}) == 1, "parts of one selection must share a device"
    ks_t = _check(parts, torch.as_tensor(ks, dtype=torch.int64), group, stats, collectives, at_most)
    ks = ks_t.tolist()
    stats.chosen = list(ks)
    if group is LOCAL:
        stats.host_reads += 4 * n  # k-th key, count above it, tied positions, tie-key bound
        return [_local_topk(p, k) for p, k in zip(parts, ks)]

    # Phase 1: the largest key v with count(key >= v) >= k (the k-th largest key).
    lo = torch.full((n,), KEY_MIN, dtype=torch.int64)
    hi = torch.full((n,), KEY_MAX, dtype=torch.int64)
    while bool((lo < hi).any()):  # lo, hi live on the host: no device read to decide
        mid = (lo + hi + 1) // 2
        counts = _counts([(p.eligible & (p.keys >= v)).sum() for p, v in zip(parts, mid.tolist())], group, stats,
                         collectives)
        stats.rounds += 1
        ok = counts >= ks_t
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid - 1)
    kth = lo.tolist()
    above = _counts([(p.eligible & (p.keys > v)).sum() for p, v in zip(parts, kth)], group, stats, collectives)
    stats.rounds += 1
    need = ks_t - above  # how many of the elements tied at the k-th key are taken, smallest tie key first

    # Phase 2: among elements tied at the k-th key, the smallest tie-key bound t with
    # count(tie key <= t) >= need. The tied elements are few; finding them is one read per tensor.
    tied_pos = [torch.nonzero(p.eligible & (p.keys == v)).flatten() for p, v in zip(parts, kth)]
    stats.host_reads += n  # nonzero sizes its output on the host
    tied_keys = [p.tie_keys(pos) for p, pos in zip(parts, tied_pos)]
    lo = torch.full((n,), -1, dtype=torch.int64)
    hi = torch.as_tensor([(1 << p.tie_bits) - 1 for p in parts], dtype=torch.int64)
    lo = torch.where(need > 0, torch.zeros_like(lo), lo)
    hi = torch.where(need > 0, hi, lo)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        counts = _counts([(tk <= v).sum() for tk, v in zip(tied_keys, mid.tolist())], group, stats, collectives)
        stats.rounds += 1
        ok = counts >= need
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    bound = hi.tolist()
    return [_select(p, v, pos, tk, b) if k else torch.zeros_like(p.eligible)
            for p, v, b, pos, tk, k in zip(parts, kth, bound, tied_pos, tied_keys, ks)]
