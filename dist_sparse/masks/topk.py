"""Top-k selection whose result is a pure function of the score values.

Every data-parallel rank computes masks independently and must arrive at the same bits
(DESIGN.md section 3.3). ``torch.topk`` does not promise which of several equal scores it
returns, and the answer differs between CPU and CUDA kernels, so it cannot be used for the
*choice*. Here the order is fixed explicitly:

    a comes before b  <=>  score(a) > score(b), or score(a) == score(b) and index(a) < index(b)

where ``index`` is the flat (row-major, logical) index. ``torch.topk`` is still used, but only
for the k-th largest *value*, which is unique whatever the tie handling; the ties at that value
are then resolved by index with a cumulative sum, so no step relies on sort stability.

Scores are compared in at least float32: bfloat16/float16 are upcast (so a rank holding bf16
and one holding fp32 copies of the same values agree), float64 stays float64. ``-0.0`` and
``0.0`` compare equal and are therefore ties. NaN has no place in a total order and raises.

The threshold functions (``kth_value_threshold``, ``select_by_threshold``,
``topk_candidates``, ``merge_topk_candidates``) let ranks that each hold a contiguous slice of
a flattened tensor (ZeRO partitions) agree on a global top-k by exchanging a few candidates and
one (value, index) pair instead of whole tensors.
"""

from __future__ import annotations

import hashlib
import math
import operator
import struct
from collections.abc import Sequence

import torch

# The (value, index) threshold that selects nothing: no score is > +inf, and no flat index
# (>= 0, offsets >= 0) is <= -1. Returned for k == 0 so callers need no special case.
EMPTY_THRESHOLD: tuple[float, int] = (math.inf, -1)


def _as_scores(scores: torch.Tensor, name: str = "scores") -> torch.Tensor:
    """Scores as a comparison dtype of at least float32; rejects non-float dtypes and NaN."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {scores.dtype}; pass e.g. {name}.float()")
    # promote_types keeps float64 exact and lifts bf16/fp16 to fp32; .to() copies only if needed,
    # and nothing below writes into the result, so the caller's tensor is never modified.
    x = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if x.numel() and bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN; scores must be totally ordered (check for inf-inf or 0/0 upstream)")
    return x


def _as_count(k, name: str, upper: int) -> int:
    """k as a Python int in [0, upper]."""
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {k!r}") from None
    if not 0 <= k <= upper:
        raise ValueError(f"{name}={k} is out of range: it must be in [0, {upper}]")
    return k


def _kth_largest_rows(x_rc: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of every row of a 2-D tensor, shape (rows, 1); 1 <= k <= cols."""
    cols = x_rc.shape[-1]
    assert 1 <= k <= cols
    # Ask topk for the smaller side: the k-th largest is also the (cols-k+1)-th smallest.
    # Values from topk are exact whichever tied elements it picked.
    if k <= cols - k + 1:
        return torch.topk(x_rc, k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
    return torch.topk(x_rc, cols - k + 1, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)


def topk_rows_mask(x_rc: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of a 2-D score tensor, the k first elements in the deterministic order.

    Internal building block shared with the N:M pattern (same k in every row). ``x_rc`` must
    already be validated (floating, no NaN).
    """
    assert x_rc.dim() == 2
    rows, cols = x_rc.shape
    assert 0 <= k <= cols
    if k == 0 or rows == 0:
        return torch.zeros_like(x_rc, dtype=torch.bool)
    if k == cols:
        return torch.ones_like(x_rc, dtype=torch.bool)
    kth = _kth_largest_rows(x_rc, k)
    above = x_rc > kth
    # Everything strictly above the k-th value is in; the remaining slots go to the elements
    # equal to it, lowest index first: a running count of ties along the row picks them.
    need = k - above.sum(dim=-1, keepdim=True)
    tied = x_rc == kth
    chosen = above | (tied & (tied.cumsum(dim=-1) <= need))
    assert bool((chosen.sum(dim=-1) == k).all())
    return chosen


def deterministic_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask, shaped like ``scores``, True at exactly the ``k`` largest scores.

    Ties are broken by lower flat (row-major) index, so the result depends only on the values:
    identical on every rank and on CPU and GPU. ``k`` must be in ``[0, scores.numel()]``.
    """
    x = _as_scores(scores)
    k = _as_count(k, "k", x.numel())
    return topk_rows_mask(x.reshape(1, -1), k).reshape(scores.shape)


def topk_among(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest scores among positions where ``candidates`` is True.

    Positions outside ``candidates`` are never selected whatever their score (e.g. regrow only
    among currently pruned weights). Ties are broken by lower flat index.
    """
    x = _as_scores(scores)
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool:
        raise ValueError("candidates must be a torch.bool tensor")
    if candidates.shape != scores.shape:
        raise ValueError(f"candidates shape {tuple(candidates.shape)} differs from scores shape {tuple(scores.shape)}")
    flat_candidates = candidates.reshape(-1).to(x.device)
    available = int(flat_candidates.sum())
    k = _as_count(k, "k (number to select among candidates)", available)
    # Boolean indexing keeps positions in ascending order, so "lower index among the
    # candidates" is "lower index in the full tensor": the tie rule carries over unchanged.
    positions = flat_candidates.nonzero().squeeze(1)
    chosen_among = topk_rows_mask(x.reshape(-1)[positions].reshape(1, -1), k).reshape(-1)
    out = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    out[positions[chosen_among]] = True
    return out.reshape(scores.shape)


def kth_value_threshold(scores: torch.Tensor, k: int) -> tuple[float, int]:
    """(value, flat index) of the k-th element in the deterministic order.

    ``select_by_threshold(scores, value, index)`` then equals
    ``deterministic_topk_mask(scores, k)``. For ``k == 0`` returns ``EMPTY_THRESHOLD``
    ``(inf, -1)``, which selects nothing.
    """
    x = _as_scores(scores).reshape(-1)
    k = _as_count(k, "k", x.numel())
    if k == 0:
        return EMPTY_THRESHOLD
    kth = _kth_largest_rows(x.reshape(1, -1), k).reshape(())
    need = k - int((x > kth).sum())
    tied_positions = (x == kth).nonzero().squeeze(1)
    assert 1 <= need <= tied_positions.numel()
    return float(kth), int(tied_positions[need - 1])


def select_by_threshold(scores: torch.Tensor, value: float, index: int, index_offset: int = 0) -> torch.Tensor:
    """Mask of positions at or before ``(value, index)`` in the deterministic order.

    A position with flat index ``i`` is selected when ``score > value``, or ``score == value``
    and ``i + index_offset <= index``. With ``index_offset`` a rank holding the contiguous slice
    ``flat[offset : offset + n]`` of a flattened tensor applies a global threshold to it.
    ``value`` is compared in the scores' comparison dtype (float32 for bf16/fp16/fp32 scores),
    which is exact for values that came from such scores.
    """
    x = _as_scores(scores)
    value = float(value)
    if math.isnan(value):
        raise ValueError("threshold value is NaN; it must come from kth_value_threshold or merge_topk_candidates")
    index = operator.index(index)
    index_offset = operator.index(index_offset)
    if index_offset < 0:
        raise ValueError(f"index_offset={index_offset} must be >= 0 (the slice's start in the flattened tensor)")
    threshold = torch.tensor(value, dtype=x.dtype, device=x.device)
    flat = x.reshape(-1)
    tied = flat == threshold
    # A tie qualifies only up to the threshold's index: in local coordinates, positions
    # 0 .. index - index_offset. Clearing the rest of our own fresh tensor avoids building an
    # int64 index tensor as large as the parameter.
    first_excluded = max(0, index - index_offset + 1)
    tied[first_excluded:] = False
    return ((flat > threshold) | tied).reshape(scores.shape)


def topk_candidates(scores: torch.Tensor, k: int, index_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This slice's candidates for a global top-k: (values, global flat indices), 1-D each.

    The first ``min(k, numel)`` elements of the slice in the deterministic order, returned in
    ascending index order (not ranked). Every element of the global top-k lies among its
    slice's candidates, because the order inside a contiguous slice is the global order
    restricted to it; ``merge_topk_candidates`` over all slices therefore finds the global
    k-th (value, index). Values are in the comparison dtype (float32 for bf16/fp32 scores).
    """
    x = _as_scores(scores).reshape(-1)
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    index_offset = operator.index(index_offset)
    if index_offset < 0:
        raise ValueError(f"index_offset={index_offset} must be >= 0 (the slice's start in the flattened tensor)")
    chosen = topk_rows_mask(x.reshape(1, -1), min(k, x.numel())).reshape(-1)
    local = chosen.nonzero().squeeze(1)
    return x[local], local + index_offset


def merge_topk_candidates(candidates: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[float, int]:
    """Global k-th (value, index) from every slice's ``topk_candidates``.

    ``candidates`` is a list of (values, global_indices) pairs (e.g. all-gathered from the
    ranks); indices must be distinct. ``k`` must not exceed the number of candidates. For
    ``k == 0`` returns ``EMPTY_THRESHOLD``.
    """
    if len(candidates) == 0:
        raise ValueError("candidates is empty: pass one (values, global_indices) pair per slice")
    values_parts, index_parts = [], []
    for i, (values, indices) in enumerate(candidates):
        if values.dim() != 1 or indices.dim() != 1 or values.numel() != indices.numel():
            raise ValueError(
                f"candidate pair {i} must be two 1-D tensors of equal length, got shapes "
                f"{tuple(values.shape)} and {tuple(indices.shape)}"
            )
        # Gathered candidates normally share one device; use the first pair's.
        device = values_parts[0].device if values_parts else values.device
        values_parts.append(_as_scores(values, f"candidate values {i}").to(device))
        index_parts.append(indices.to(device, torch.int64))
    dtype = values_parts[0].dtype
    for part in values_parts:
        dtype = torch.promote_types(dtype, part.dtype)
    values = torch.cat([v.to(dtype) for v in values_parts])
    indices = torch.cat(index_parts)
    k = _as_count(k, "k", values.numel())
    if k == 0:
        return EMPTY_THRESHOLD
    if indices.unique().numel() != indices.numel():
        raise ValueError("candidate global indices are not distinct: slices overlap or an offset is wrong")
    kth = _kth_largest_rows(values.reshape(1, -1), k).reshape(())
    need = k - int((values > kth).sum())
    # Candidates arrive in slice order, not globally sorted: sort the tied indices explicitly.
    tied_indices = indices[values == kth].sort().values
    assert 1 <= need <= tied_indices.numel()
    return float(kth), int(tied_indices[need - 1])


def stable_seed(seed: int, step: int, param_index: int) -> int:
    """A 63-bit seed derived from (seed, step, param_index), the same in every process.

    Python's ``hash()`` is salted per process (PYTHONHASHSEED), so it would give every rank a
    different generator. blake2b over the packed integers is stable across processes, machines
    and versions; the personalization string keeps this stream apart from other hashes built
    from the same integers. Masked to 63 bits so it is a valid non-negative int64 seed.
    """
    try:
        payload = struct.pack("<qqq", seed, step, param_index)
    except struct.error:
        raise ValueError(
            f"seed, step and param_index must be int64 integers, got {seed!r}, {step!r}, {param_index!r}"
        ) from None
    digest = hashlib.blake2b(payload, digest_size=8, person=b"dsparse.rand").digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_scores(
    shape: Sequence[int] | torch.Size, seed: int, step: int, param_index: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Uniform [0, 1) float32 scores keyed by (seed, step, param_index), identical on every rank.

    Generated on CPU and then moved, because the CPU and CUDA generators give different streams
    for the same seed: a GPU rank and a CPU reference must regrow the same positions.
    """
    generator = torch.Generator(device="cpu").manual_seed(stable_seed(seed, step, param_index))
    shape = tuple(shape)
    if any(operator.index(d) < 0 for d in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    return torch.rand(shape, generator=generator, dtype=torch.float32).to(device)


def tie_order_bits(numel: int) -> int:
    """Bits of the tie-order keys of a tensor of ``numel`` elements (``tie_order`` is a
    permutation of [0, 2**bits))."""
    return max(1, (max(numel, 1) - 1).bit_length())


def tie_order(index: torch.Tensor, salt: int, bits: int) -> torch.Tensor:
    """A seeded permutation of [0, 2**bits) applied to flat indices: the order in which elements
    tied at the threshold score are taken (smallest key first).

    Breaking ties by the index itself favours the first rows of every weight (the first heads and
    neurons) on every update; under bf16 thousands of scores can tie at the threshold. Each step
    here (xor with the salt, multiplication by an odd constant, xor with a right shift, all modulo
    2**bits) is a bijection, so distinct indices keep distinct keys and the choice stays exact.
    ``salt`` (from ``stable_seed``) makes the order differ per weight and per update. int64
    products wrap modulo 2**64, whose low ``bits`` bits are the product modulo 2**bits.
    """
    if not 1 <= bits <= 62:
        raise ValueError(f"tie_order needs 1..62 bits, got {bits}")
    mask = (1 << bits) - 1
    x = (index.to(torch.int64) ^ (salt & mask)) & mask
    for mult in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9):
        x = (x * ((mult & mask) | 1)) & mask
        x = x ^ (x >> ((bits + 1) // 2))
    return x
