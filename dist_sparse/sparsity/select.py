"""Top-k over a tensor whose elements are spread across ranks, by exchanging counts only.

A mask decision ("keep the k largest scores of this weight") must be the same function of the
*whole* logical weight whatever the layout: one rank holding it all (ZeRO-1/2), tensor-parallel
shards (AutoTP), or flat ZeRO-3 partitions of those shards. Gathering the scores would cost a
whole tensor per weight; instead every holder counts how many of its elements lie above a
candidate threshold, the counts are summed over the holders, and the threshold is bisected:
first over the 32-bit order-preserving key of the float score, then, for elements tied at the
k-th key, over their tie keys: ``masks.topk.tie_order`` of the global flat index, salted per
weight and update (the one tie rule of every mask decision; smaller key wins).

Nothing here waits for the device until the very end: thresholds, counts and ``k`` live in
device tensors, the count vector of all tensors is all-reduced as a device tensor (NCCL on a
GPU), and the bisection runs a fixed number of rounds (32 over the score key, one for the count
above the k-th key, then as many as the widest tie key has bits), so no round has to read
whether it is done. A call makes exactly one device-to-host read, whatever the number of
tensors: the NaN and eligible counts with which it validates (it raises, on every rank alike,
after selecting) and which give ``SelectStats.chosen``.

A rank that holds whole tensors (``LOCAL``) does not bisect: per tensor it takes ``torch.topk``
of one int64 key per element that encodes the whole order (score key high, complemented tie
key low); the keys are all distinct, so the chosen set does not depend on the kernel's ties.
LOCAL goes tensor by tensor: a ``Part`` may compute its keys when the selection reaches it, so
the scores of all weights never exist at once.
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
SCORE_ROUNDS = 32  # bisection of [KEY_MIN, KEY_MAX]: 2**32 candidates, halved each round
# Tie keys fit an int32 (the split bisection's codes) and the low bits of LOCAL's composite
# int64 key beside the 32-bit score key.
MAX_TIE_BITS = 31


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the same order as the float32 scores (IEEE-754 bit trick), all in
    (KEY_MIN, KEY_MAX).

    Positive floats already order like their bit patterns; negative ones order in reverse, so
    their magnitude bits are flipped. ``+ 0.0`` turns -0.0 into +0.0 so the two tie. NaN becomes
    -inf (it is counted and reported by ``distributed_topk``), so no key is KEY_MIN or KEY_MAX
    (those are NaN bit patterns): the selection uses KEY_MIN for ineligible elements.
    """
    s = scores.detach().float().contiguous() + 0.0
    s = torch.nan_to_num(s, nan=float("-inf"))
    bits = s.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, untouched where it is there already (``costs.count_costs`` counts
    every ``.to("cpu")`` as a crossing to the host, even a no-op one)."""
    return t if t.device == torch.device(device) else t.to(device)


def keys_and_nans(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat sortable keys of ``scores`` and their NaN count (a device scalar, read later)."""
    return sortable_keys(scores).flatten(), torch.isnan(scores).sum()


@dataclass
class Part:
    """This rank's share of one logical tensor's selection problem.

    ``keys``: sortable keys of the local elements (1-D int64), or a function returning
    ``(keys, nan_count)`` when the selection reaches this part (scores computed tensor by
    tensor, see ``keys_and_nans``). ``eligible``: which of them may be chosen, on the device
    the keys will be on. ``global_index``: maps local positions (1-D LongTensor) to their flat
    index in the logical tensor of ``numel_global`` elements. ``salt``: of their tie order
    (``stable_seed(seed, step, weight)``). ``nan_count``: with key tensors, how many scores were
    NaN (an int, or a device scalar read with the other counts, in one go).
    """

    keys: torch.Tensor | Callable[[], tuple[torch.Tensor, torch.Tensor]]
    eligible: torch.Tensor
    global_index: Callable[[torch.Tensor], torch.Tensor]
    numel_global: int
    salt: int
    nan_count: int | torch.Tensor = 0

    def __post_init__(self):
        if isinstance(self.keys, torch.Tensor):
            self.eligible = on_device(self.eligible, self.keys.device)

    @property
    def device(self) -> torch.device:
        return self.keys.device if isinstance(self.keys, torch.Tensor) else self.eligible.device

    @property
    def tie_bits(self) -> int:
        return tie_order_bits(self.numel_global)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, NaN count as an int64 device scalar), computing them if they are lazy."""
        keys, nans = self.keys() if callable(self.keys) else (self.keys, self.nan_count)
        if not isinstance(nans, torch.Tensor):
            nans = torch.full((), nans, dtype=torch.int64, device=keys.device)  # a fill: no copy to wait for
        return keys, nans.to(torch.int64)

    def all_tie_keys(self) -> torch.Tensor:
        """Tie keys of every local position: a seeded permutation of [0, 2**tie_bits) of their
        global index."""
        pos = torch.arange(self.eligible.numel(), device=self.eligible.device)
        return tie_order(self.global_index(pos), self.salt, self.tie_bits)


@dataclass
class SelectStats:
    allreduces: int = 0   # collectives sent (none for LOCAL or a group of one)
    bytes: int = 0        # their payload
    rounds: int = 0       # bisection rounds (each one count vector for all tensors)
    chosen: list = field(default_factory=list)  # the k selected of every tensor (after ``at_most``)
    host_reads: int = 0   # device-to-host reads (what ``costs.count_costs`` counts): one per call


def _sum_over(t: torch.Tensor, group, stats: SelectStats, collectives) -> torch.Tensor:
    """Sum a device vector of counts over ``group`` in place (one all-reduce for all tensors)."""
    if group is not LOCAL and collectives.world_size(group) > 1:
        collectives.all_reduce_sum_(t, group)
        stats.allreduces += 1
        stats.bytes += t.numel() * t.element_size()
    return t


def _device_ints(values: list[int], device) -> torch.Tensor:
    """An int64 vector of host ints made on ``device`` by fills: ``torch.tensor(values,
    device=cuda)`` would copy from pageable host memory, which waits for the stream."""
    out = torch.empty(len(values), dtype=torch.int64, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


def _validate(ks: list[int], nans: torch.Tensor, eligible: torch.Tensor, at_most: bool,
              stats: SelectStats) -> list[int]:
    """The one host read of a call: raise on NaN scores or on a k beyond the eligible count
    (``at_most``: lower it instead); the same on every rank, since the counts were summed over
    the group. Returns the ks selected."""
    head = torch.stack([nans, eligible]).tolist()
    stats.host_reads += 1
    nan_counts, eligible_total = head
    if any(nan_counts):
        raise ValueError(f"mask scores contain NaN ({sum(nan_counts)} values): diverged weights or gradients?")
    chosen = [min(k, e) for k, e in zip(ks, eligible_total)] if at_most else list(ks)
    for k, e in zip(chosen, eligible_total):
        if k > e:
            raise ValueError(f"cannot select {k} of {e} eligible elements")
    stats.chosen = chosen
    return chosen


def _local_topk(keys: torch.Tensor, eligible: torch.Tensor, tie_keys: torch.Tensor, bits: int,
                k: int) -> torch.Tensor:
    """The k first eligible elements of a whole tensor (``eligible`` holds at least k, else the
    eligible ones all). One int64 per element encodes the order: the score key (shifted to be
    non-negative) in the high bits, ``2**bits - 1 - tie key`` in the low ``bits``: larger means
    earlier, and keys are distinct because tie keys are, so the top k is one set whichever way
    ``torch.topk`` treats ties. Ineligible elements get -1, below every eligible one; any that
    ``topk`` takes (fewer eligible than k) are dropped again by ``& eligible``."""
    if k == 0 or keys.numel() == 0:
        return torch.zeros_like(eligible)
    low = (1 << bits) - 1
    order = torch.where(eligible, ((keys - KEY_MIN) << bits) | (low - tie_keys), -1)
    top = torch.topk(order, min(k, order.numel()), sorted=False).indices
    return torch.zeros_like(eligible).scatter_(0, top, True) & eligible


def distributed_topk(parts: list[Part], ks: list[int], group, stats: SelectStats | None = None,
                     collectives=None, at_most: bool = False) -> list[torch.Tensor]:
    """Boolean masks over each part's local elements: the global top-``k`` of every tensor.

    Every rank of ``group`` must call this with parts of the same tensors in the same order and
    the same ``ks`` (Python ints). ``k`` may not exceed the number of eligible elements over
    the group (with ``at_most`` it is lowered to that number; ``stats.chosen`` says what was
    selected). All parts lie on one device. ``collectives``: what sums the counts over
    ``group`` (default ``distributed.comm``; the one-process fake layout passes threads
    standing in for ranks).
    """
    stats = stats if stats is not None else SelectStats()
    collectives = collectives or comm
    if not parts:
        return []
    if any(k < 0 for k in ks):
        raise ValueError(f"cannot select a negative count: {ks}")
    assert len({p.device for p in parts}) == 1, "parts of one selection must share a device"
    if any(p.tie_bits > MAX_TIE_BITS for p in parts):
        raise ValueError(f"a weight of more than 2**{MAX_TIE_BITS} elements is beyond the selection's int32 tie keys")
    if group is LOCAL:
        return _select_local(parts, ks, stats, at_most)
    return _select_split(parts, ks, group, stats, collectives, at_most)


def _select_local(parts: list[Part], ks: list[int], stats: SelectStats, at_most: bool) -> list[torch.Tensor]:
    """Tensor by tensor: keys (and the scores behind them) of one tensor at a time."""
    masks, nans, eligible = [], [], []
    for p, k in zip(parts, ks):
        keys, nan = p.load()
        elig = on_device(p.eligible, keys.device)
        masks.append(_local_topk(keys, elig, p.all_tie_keys(), p.tie_bits, k))
        nans.append(nan)
        eligible.append(elig.sum())
    # After selecting: a NaN or a k beyond the eligible count raises here all the same.
    _validate(ks, torch.stack(nans), torch.stack(eligible), at_most, stats)
    return masks


def _select_split(parts: list[Part], ks: list[int], group, stats: SelectStats, collectives,
                  at_most: bool) -> list[torch.Tensor]:
    """The bisection over the ranks of ``group``, all tensors in every round.

    The keys of all tensors stay resident in one int32 buffer (4 bytes per local element; for
    BERT-large's ~302M sparse weights that is 1.2 GB / the number of ranks sharing them, e.g.
    151 MB per rank for 8 ZeRO-3 ranks), first as score keys (ineligible: KEY_MIN, below every
    candidate threshold), then overwritten by the tie phase's codes.
    """
    device = parts[0].device
    n = len(parts)
    sizes = [p.eligible.numel() for p in parts]
    buf = torch.empty(sum(sizes), dtype=torch.int32, device=device)
    views = list(buf.split(sizes))
    nans, eligible = [], []
    for p, v in zip(parts, views):
        keys, nan = p.load()
        elig = on_device(p.eligible, device)
        v.copy_(torch.where(elig, keys, KEY_MIN))
        nans.append(nan)
        eligible.append(elig.sum())
    head = _sum_over(torch.stack(nans + eligible), group, stats, collectives)
    nan_total, eligible_total = head[:n], head[n:]
    want = _device_ints(ks, device)
    if at_most:
        want = torch.minimum(want, eligible_total)

    def counts(fn) -> torch.Tensor:
        stats.rounds += 1
        return _sum_over(torch.stack([fn(i, v) for i, v in enumerate(views)]), group, stats, collectives)

    # Phase 1: the largest key v with count(key >= v) >= k (the k-th largest key; KEY_MAX for k = 0).
    lo = torch.full((n,), KEY_MIN, dtype=torch.int64, device=device)
    hi = torch.full((n,), KEY_MAX, dtype=torch.int64, device=device)
    for _ in range(SCORE_ROUNDS):
        mid = (lo + hi + 1) // 2  # > KEY_MIN: ineligible elements never count
        ok = counts(lambda i, v: (v >= mid[i]).sum()) >= want
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid - 1)
    kth = lo
    need = want - counts(lambda i, v: (v > kth[i]).sum())  # taken of the tied, smallest tie key first

    # Phase 2: codes in place of the keys: -1 above the k-th key (taken), the tie key (>= 0) at
    # it, KEY_MIN below it or ineligible. The smallest bound b with count(0 <= code <= b) >= need.
    below_zero = []
    for i, (p, v) in enumerate(zip(parts, views)):
        code = torch.where(v > kth[i], -1, torch.where(v == kth[i], p.all_tie_keys(), KEY_MIN))
        v.copy_(code)
        below_zero.append((v < 0).sum())
    below_zero = torch.stack(below_zero)  # local, subtracted before summing: tied counts only
    top = _device_ints([(1 << p.tie_bits) - 1 for p in parts], device)
    lo = torch.where(need > 0, 0, -1)
    hi = torch.where(need > 0, top, -1)
    for _ in range(max(p.tie_bits for p in parts)):
        mid = (lo + hi) // 2
        ok = counts(lambda i, v: (v <= mid[i]).sum() - below_zero[i]) >= need
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    bound = hi  # -1 where nothing tied is taken
    masks = [(v <= bound[i]) & (v != KEY_MIN) for i, v in enumerate(views)]
    _validate(ks, nan_total, eligible_total, at_most, stats)
    return masks
