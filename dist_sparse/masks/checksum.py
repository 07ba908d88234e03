"""Compact mask encodings: bit packing for checkpoints, 63-bit fingerprints for rank checks.

After every mask update the ranks all-reduce one int64 fingerprint per parameter (min and
max, or a gather) instead of comparing masks, and fail naming the parameter when they differ
(DESIGN.md section 3.3). Packing stores a mask in 1 bit per weight instead of 8.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import torch

# Bit weights of one packed byte, most significant bit first: the same layout as
# numpy.packbits(bitorder="big"), so packed masks can be read with numpy.unpackbits.
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def _check_mask(mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a torch.bool tensor, got {got}")


def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pack a bool mask into bytes: (uint8 tensor of ceil(numel / 8), shape).

    Row-major order, 8 elements per byte, first element in the most significant bit, the last
    byte padded with zero bits. Runs on the mask's device; the result stays there.
    """
    _check_mask(mask)
    shape = tuple(mask.shape)
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    # uint8 products of 0/1 with distinct powers of two sum to at most 255: no overflow.
    packed = (flat.reshape(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
    return packed, shape


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_mask``: the bool mask of ``shape``, on ``packed``'s device."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D torch.uint8 tensor from pack_mask")
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed holds {packed.numel()} bytes but shape {shape} needs {(numel + 7) // 8}; "
            "the mask and its shape do not belong together"
        )
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) & weights) != 0
    bits = bits.reshape(-1)
    if bool(bits[numel:].any()):
        raise ValueError("packed mask has non-zero padding bits: it is corrupt or was not made by pack_mask")
    return bits[:numel].reshape(shape)


def mask_fingerprint(mask: torch.Tensor) -> int:
    """A 63-bit hash of a mask's bits and shape; fits a non-negative int64 for collectives.

    Equal masks give equal fingerprints on any device; a changed bit or a different shape with
    the same bits gives a different one (up to hash collisions, ~2**-63). Packs on the mask's
    device and copies only the packed bytes to the host.
    """
    packed, shape = pack_mask(mask)
    h = hashlib.blake2b(digest_size=8, person=b"dsparse.mask")
    # The shape goes in first, with its rank, so [2, 8] and [16] masks of the same bits differ.
    h.update(struct.pack(f"<q{len(shape)}q", len(shape), *shape))
    h.update(packed.cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
