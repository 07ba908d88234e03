"""Pure tensor functions for masks: deterministic top-k, block and N:M patterns, per-layer
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
    EMPTY_THRESHOLD,
    deterministic_topk_mask,
    kth_value_threshold,
    merge_topk_candidates,
    random_scores,
    select_by_threshold,
    stable_seed,
    tie_order,
    tie_order_bits,
    topk_among,
    topk_candidates,
)

__all__ = [
    "tie_order",
    "tie_order_bits",
    "EMPTY_THRESHOLD",
    "NmHalo",
    "active_counts",
    "block_scores",
    "check_block_aligned",
    "check_nm",
    "deterministic_topk_mask",
    "erk_densities",
    "expand_block_mask",
    "kth_value_threshold",
    "mask_fingerprint",
    "merge_topk_candidates",
    "nm_halo",
    "nm_mask",
    "nm_slice_mask",
    "pack_mask",
    "random_scores",
    "select_by_threshold",
    "stable_seed",
    "topk_among",
    "topk_candidates",
    "uniform_densities",
    "unpack_mask",
]
