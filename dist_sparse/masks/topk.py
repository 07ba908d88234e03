"""The one order in which mask decisions take elements: larger score first, ties in a seeded order.

Every data-parallel rank computes masks independently and must arrive at the same bits
(DESIGN.md section 3.3), so the choice among equal scores is fixed explicitly rather than left
to ``torch.topk`` (whose tie handling differs between CPU and CUDA kernels):

    a comes before b  <=>  score(a) > score(b), or score(a) == score(b) and key(a) < key(b)

where ``key`` is ``tie_order`` of the element's flat (row-major) index in the *logical* weight,
salted by ``stable_seed(seed, step, weight)``. The key depends on neither the rank nor the
parallel layout, so every layout takes the same elements; and unlike the index itself it does
not favour the first rows (the first heads and neurons) every time scores tie, which in bf16
they do by the thousand. ``sparsity.select`` (top-k of whole weights, across ranks) and the N:M
pattern (``topk_rows_mask``) both order by it.

Scores are compared in at least float32 (bf16/fp16 are upcast, float64 stays); ``-0.0`` and
``0.0`` are equal. NaN has no place in a total order: the pure functions raise on it.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections.abc import Sequence

import torch


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


def topk_rows_mask(x_rc: torch.Tensor, k: int, tie_keys_rc: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D score tensor, the ``k`` first elements in the order above; ``tie_keys_rc``
    (same shape, distinct within a row) rank equal scores, smaller first.

    ``x_rc`` must already be validated (floating, no NaN). Two passes: sort every row by tie key,
    then stably by descending score, so equal scores stay in key order.
    """
    assert x_rc.dim() == 2 and tie_keys_rc.shape == x_rc.shape
    rows, cols = x_rc.shape
    assert 0 <= k <= cols
    if k == 0 or rows == 0:
        return torch.zeros_like(x_rc, dtype=torch.bool)
    if tie_keys_rc.device != x_rc.device:  # (a no-op .to("cpu") would count as a host crossing)
        tie_keys_rc = tie_keys_rc.to(x_rc.device)
    by_key = tie_keys_rc.argsort(dim=-1)
    # + 0.0 turns -0.0 into 0.0: a radix sort would otherwise put one before the other.
    ordered = (x_rc + 0.0).gather(-1, by_key)
    by_score = torch.sort(ordered, dim=-1, descending=True, stable=True).indices
    chosen = by_key.gather(-1, by_score[:, :k])
    return torch.zeros_like(x_rc, dtype=torch.bool).scatter_(-1, chosen, True)


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


def _int64(c: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", 2014): the
# increment of its counter and the multipliers of its output mixer.
_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits: torch's >> is arithmetic (copies the sign bit), so the
    top ``s`` bits it fills are cleared."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_uniform(index: torch.Tensor, salt: int) -> torch.Tensor:
    """Uniform [0, 1) float32 of integer ``index`` (any shape), a pure function of (salt, index).

    The value of element ``i`` is the ``i``-th output of a splitmix64 stream seeded with
    ``salt``: its counter ``salt + (i + 1) * golden`` through the splitmix64 finaliser (a
    bijection of 64-bit words whose every output bit depends on every input bit). It is
    computed by int64 operations on whatever device ``index`` lives on, with no generator
    state, so a CPU and a GPU, and a rank holding any slice of a tensor, compute the same bits
    for the same index. int64 products and sums wrap modulo 2**64 (as unsigned ones would).
    The top 24 bits make the float: every value is a multiple of 2**-24 (as ``torch.rand``'s).
    """
    z = (index.to(torch.int64) + 1) * _GOLDEN + _int64(salt & ((1 << 64) - 1))
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) * (1.0 / (1 << 24))


def random_scores_at(index: torch.Tensor, seed: int, step: int, param_index: int) -> torch.Tensor:
    """The uniform scores of weight ``param_index`` at ``step`` for the flat indices ``index`` of
    the logical weight, on ``index``'s device: what ``random_scores`` of the whole weight holds
    at those indices, computed for them alone (a rank holding a slice draws only its slice)."""
    return hash_uniform(index, stable_seed(seed, step, param_index))


def random_scores(
    shape: Sequence[int] | torch.Size, seed: int, step: int, param_index: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Uniform [0, 1) float32 scores keyed by (seed, step, param_index), identical on every rank
    and device: ``hash_uniform`` of the row-major flat index of every element."""
    shape = tuple(shape)
    if any(operator.index(d) < 0 for d in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    numel = 1
    for d in shape:
        numel *= d
    return random_scores_at(torch.arange(numel, device=device), seed, step, param_index).view(shape)


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
