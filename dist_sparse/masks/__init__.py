"""Pure tensor functions for masks: the deterministic tie order, block and N:M patterns, per-layer
density allocation, bit packing and fingerprints. No state, no collectives: the same inputs
give the same bits on every rank and device."""

from dist_sparse.masks.checksum import mask_fingerprint, pack_mask, unpack_mask
from dist_sparse.masks.density import active_counts, erk_densities, uniform_densities
from dist_sparse.masks.patterns import (
    block_scores,
    check_block_aligned,
    check_nm,
    NmHalo,
    expand_block_mask,
    nm_halo,
    nm_mask,
    nm_slice_mask,
)
from dist_sparse.masks.topk import (
    random_scores,
    stable_seed,
    tie_order,
    tie_order_bits,
)

__all__ = [
    "tie_order",
    "tie_order_bits",
    "NmHalo",
    "active_counts",
    "block_scores",
    "check_block_aligned",
    "check_nm",
    "erk_densities",
    "expand_block_mask",
    "mask_fingerprint",
    "nm_halo",
    "nm_mask",
    "nm_slice_mask",
    "pack_mask",
    "random_scores",
    "stable_seed",
    "uniform_densities",
    "unpack_mask",
]
