"""Mask functions: the tie order, random scores, patterns, densities, packing, fingerprints."""

import math

import numpy as np
import pytest
import torch

from dist_sparse.masks import (
    NmHalo,
    active_counts,
    block_scores,
    check_block_aligned,
    check_nm,
    erk_densities,
    expand_block_mask,
    mask_fingerprint,
    nm_halo,
    nm_mask,
    nm_slice_mask,
    pack_mask,
    random_scores,
    stable_seed,
    tie_order,
    tie_order_bits,
    uniform_densities,
    unpack_mask,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_topk(scores, k, keys):
    """Plain-Python reference: sort flat positions by (score desc, tie key asc), take k."""
    flat, key = scores.double().reshape(-1).tolist(), keys.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], key[i]))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def seeded_keys(shape, salt=stable_seed(1, 2, 3)):
    """The product's tie keys of a whole weight: tie_order of the flat index."""
    numel = math.prod(shape)
    return tie_order(torch.arange(numel), salt, tie_order_bits(numel)).view(shape)


def tied_scores(shape, levels, seed):
    """Integer-valued float scores: many ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float()


def test_torch_stable_descending_sort_keeps_index_order_among_equals():
    # Documents the behaviour other modules may rely on when they rank with torch.sort.
    values = tied_scores((1000,), 4, 5)
    order = torch.sort(values, descending=True, stable=True).indices
    expected = sorted(range(1000), key=lambda i: (-values[i].item(), i))
    assert order.tolist() == expected


# ---------------------------------------------------------------- random scores


def test_random_scores_are_keyed_and_reproducible():
    a = random_scores((64, 32), seed=1, step=100, param_index=3)
    assert a.dtype == torch.float32 and a.shape == (64, 32)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert torch.equal(a, random_scores((64, 32), seed=1, step=100, param_index=3))
    for other in [(2, 100, 3), (1, 101, 3), (1, 100, 4)]:
        b = random_scores((64, 32), *other)
        # different streams: hardly an element in common (24-bit values: ~1 in 2**24 equal by chance)
        assert int((a == b).sum()) <= 2, other


def splitmix64_uniform(index: int, salt: int) -> float:
    """An independent reference in Python's unbounded ints: the ``index``-th output of a
    splitmix64 stream seeded with ``salt``, its top 24 bits as a float in [0, 1)."""
    word = (1 << 64) - 1
    z = (salt + (index + 1) * 0x9E3779B97F4A7C15) & word
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & word
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & word
    z ^= z >> 31
    return (z >> 40) / (1 << 24)


def test_hash_uniform_is_splitmix64_bit_for_bit():
    """torch's int64 arithmetic (arithmetic shifts masked, wrapping products) gives exactly the
    unsigned 64-bit splitmix64 of an independent Python implementation, also for indices and
    salts whose words have the top bit set."""
    from dist_sparse.masks.topk import hash_uniform

    index = torch.cat([torch.arange(2000), torch.tensor([2**31, 2**40 + 7, 2**62 - 1])])
    for salt in (0, 12345, stable_seed(1, 2, 3), 2**63 - 1):
        got = hash_uniform(index, salt).tolist()
        assert got == [splitmix64_uniform(i, salt) for i in index.tolist()], salt


def test_random_scores_are_pinned():
    # A change here silently changes every SET regrowth of resumed runs: keep it fixed.
    assert random_scores((4,), 0, 0, 0).tolist() == [0.9960197806358337, 0.21989434957504272,
                                                      0.9544399976730347, 0.9526381492614746]


def test_random_scores_of_any_slice_are_the_whole_tensors_values_at_its_indices():
    """What a TP shard (rows or columns) or a ZeRO-3 flat slice of a shard draws for its own
    global indices is the whole weight's draw there: no rank draws the full tensor."""
    from dist_sparse.masks.topk import random_scores_at

    whole = random_scores((48, 20), 5, 9, 2)
    flat_index = torch.arange(48 * 20).view(48, 20)
    for shard in (flat_index[16:32], flat_index[:, 5:15], flat_index[:, 15:]):  # TP shards, rows and columns
        assert torch.equal(random_scores_at(shard, 5, 9, 2), whole[shard // 20, shard % 20])
        for start, stop in ((0, 7), (7, 100), (100, shard.numel())):  # ZeRO-3 slices of the shard
            piece = shard.flatten()[start:stop]
            assert torch.equal(random_scores_at(piece, 5, 9, 2), whole.flatten()[piece])


def test_random_scores_are_uniform():
    """A million draws: mean and variance of U[0, 1) within 5 standard errors, and a chi-square
    over 100 equal bins below the 0.999 quantile of 99 degrees of freedom (148.2)."""
    x = random_scores((1000, 1000), seed=3, step=17, param_index=4).double()
    n = x.numel()
    assert abs(float(x.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(x.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # var of (U - 1/2)^2 is 1/180
    counts = torch.histc(x, bins=100, min=0.0, max=1.0)
    chi2 = float(((counts - n / 100) ** 2 / (n / 100)).sum())
    assert chi2 < 148.2, chi2
    # neighbouring indices are not correlated (lag-1 correlation within 5 standard errors)
    flat = x.flatten() - 0.5
    assert abs(float((flat[1:] * flat[:-1]).mean()) / (1 / 12)) < 5 / math.sqrt(n)


def test_stable_seed_is_pinned():
    # A change here silently changes every regrow decision of resumed runs: keep it fixed.
    assert stable_seed(0, 0, 0) == 3825375755606361693
    assert stable_seed(1234, 100, 7) == 4932330627962382021
    assert 0 <= stable_seed(-1, 2**62, 5) < 2**63
    with pytest.raises(ValueError, match="int64"):
        stable_seed(2**64, 0, 0)


@CUDA
def test_random_scores_and_nm_agree_on_gpu():
    cpu = random_scores((300, 200), 3, 7, 1)
    gpu = random_scores((300, 200), 3, 7, 1, device="cuda")
    assert torch.equal(cpu, gpu.cpu())
    ties = tied_scores((300, 200), 5, 9)
    ties[ties == 0] = -0.0  # a radix sort tells -0.0 from 0.0; the order must not
    keys = seeded_keys((300, 200))
    assert torch.equal(nm_mask(ties, 2, 4, keys), nm_mask(ties.cuda(), 2, 4, keys.cuda()).cpu())
    assert mask_fingerprint(ties > 2) == mask_fingerprint((ties > 2).cuda())


# ---------------------------------------------------------------- patterns


def test_block_scores_sum_each_tile():
    scores = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    blocks = block_scores(scores, 2)
    assert blocks.shape == (2, 3)
    assert blocks[0, 0] == 0 + 1 + 6 + 7 and blocks[1, 2] == 16 + 17 + 22 + 23
    assert torch.equal(block_scores(scores.bfloat16(), 2), blocks)


def test_block_scores_rejects_non_dividing_block():
    with pytest.raises(ValueError, match=r"block=4 .*\(4, 6\)"):
        block_scores(torch.zeros(4, 6), 4)
    with pytest.raises(ValueError, match="2-D"):
        block_scores(torch.zeros(4), 2)


def test_block_mask_round_trip_is_aligned():
    scores = torch.rand(8, 12, generator=torch.Generator().manual_seed(0))
    blocks = block_scores(scores, 4)
    block_mask = torch.zeros(blocks.shape, dtype=torch.bool)
    block_mask.view(-1)[blocks.flatten().topk(3).indices] = True  # distinct random sums: no ties
    mask = expand_block_mask(block_mask, 4)
    assert mask.shape == (8, 12) and int(mask.sum()) == 3 * 16
    assert check_block_aligned(mask, 4)
    assert torch.equal(mask[::4, ::4], block_mask)
    broken = mask.clone()
    broken[0, 0] = ~broken[0, 0]
    assert not check_block_aligned(broken, 4)
    assert check_block_aligned(broken, 1)


def reference_nm(scores, n, m, keys):
    rows, row_keys = scores.reshape(-1, m), keys.reshape(-1, m)
    return torch.stack([reference_topk(row, n, k) for row, k in zip(rows, row_keys)]).reshape(scores.shape)


def test_nm_mask_matches_reference_with_ties():
    for seed, (n, m) in enumerate([(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)]):
        scores = tied_scores((6, 16), 3, seed)
        scores[scores == 0] = -0.0 if seed % 2 else 0.0  # -0.0 ties with 0.0
        keys = seeded_keys((6, 16), stable_seed(seed, 0, 0))
        mask = nm_mask(scores, n, m, keys)
        assert torch.equal(mask, reference_nm(scores, n, m, keys))
        assert check_nm(mask, n, m)
        assert check_nm(mask, n, m, exact=False)


def test_nm_mask_groups_run_along_input_dimension_and_ties_follow_the_keys():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 3.0, 1.0]])
    by_index = torch.arange(8).view(1, 8)
    assert nm_mask(scores, 2, 4, by_index).tolist() == [[True, True, False, False, False, True, True, False]]
    reversed_keys = by_index.flip(1)
    assert nm_mask(scores, 2, 4, reversed_keys).tolist() == [[False, False, True, True, False, True, True, False]]


def test_check_nm_detects_violations():
    mask = nm_mask(torch.randn(4, 8), 2, 4, seeded_keys((4, 8)))
    fewer = mask.clone()
    fewer[0, fewer[0].nonzero()[0]] = False
    assert not check_nm(fewer, 2, 4) and check_nm(fewer, 2, 4, exact=False)
    more = mask.clone()
    more[0, :4] = True
    assert not check_nm(more, 2, 4, exact=False)


def test_nm_errors():
    scores, keys = torch.randn(4, 6), seeded_keys((4, 6))
    with pytest.raises(ValueError, match=r"m=4 does not divide the input dimension 6"):
        nm_mask(scores, 2, 4, keys)
    with pytest.raises(ValueError, match=r"n=3 must be in \[1, m\)"):
        nm_mask(scores, 3, 3, keys)
    with pytest.raises(ValueError, match=r"n=0"):
        nm_mask(scores, 0, 2, keys)
    with pytest.raises(ValueError, match=r"tie_keys of shape \(6, 4\)"):
        nm_mask(scores, 1, 2, keys.view(6, 4))


def zero3_slices(numel, ranks):
    """ZeRO-3's flat partitions: ceil(numel / ranks) elements each, the last ones short or empty."""
    part = -(-numel // ranks)
    return [(min(r * part, numel), min(r * part + part, numel)) for r in range(ranks)]


@pytest.mark.parametrize("shape,n,m", [((75, 36), 2, 4), ((33, 45), 1, 3), ((7, 24), 3, 8), ((5, 12), 2, 4)])
def test_nm_slice_masks_put_together_equal_the_whole_weight(shape, n, m):
    """Every rank decides its slice from its own scores and the halo its neighbours send; the
    slices put together are bit for bit ``nm_mask`` of the whole weight, also where groups
    straddle two slices and where the last slice is short or empty."""
    scores = tied_scores(shape, 3, sum(shape))  # few distinct values: ties inside straddling groups
    flat, keys = scores.flatten(), seeded_keys(shape).flatten()
    want = nm_mask(scores, n, m, keys.view(shape)).flatten()
    straddled = 0
    for ranks in (1, 2, 3, 4, 7):
        slices = zero3_slices(flat.numel(), ranks)
        if slices[0][1] < m - 1:
            continue  # the sparsifier refuses partitions this small
        halos = [nm_halo(a, b, m) for a, b in slices]
        got = []
        for r, ((a, b), h) in enumerate(zip(slices, halos)):
            # What the neighbours send: their own slice ends, sized by their own halo.
            prev_a, prev_b = slices[r - 1] if r else (0, 0)
            next_a, next_b = slices[r + 1] if r + 1 < ranks else (b, b)
            before = flat[prev_b - halos[r - 1].to_next: prev_b] if r else flat[:0]
            after = flat[next_a: next_a + halos[r + 1].to_prev] if r + 1 < ranks else flat[:0]
            assert before.numel() == h.from_prev and after.numel() == h.from_next, (ranks, r)
            straddled += h.from_prev > 0
            got.append(nm_slice_mask(flat[a:b], a, n, m, before, after, keys[a - h.from_prev:b + h.from_next]))
        assert torch.equal(torch.cat(got), want), ranks
    assert straddled > 0  # the shapes were chosen so that some slice boundary cuts a group


def test_nm_halo_and_its_errors():
    assert nm_halo(6, 15, 4) == NmHalo(from_prev=2, from_next=1, to_prev=2, to_next=3)  # [4, 8), [12, 16) cut
    assert nm_halo(8, 16, 4) == NmHalo(0, 0, 0, 0)
    assert nm_halo(16, 16, 4) == NmHalo(0, 0, 0, 0)  # an empty trailing slice
    with pytest.raises(ValueError, match="needs 2 scores before and 1 after, got 0 and 1"):
        nm_slice_mask(torch.ones(9), 6, 2, 4, torch.ones(0), torch.ones(1), torch.arange(10))


# ---------------------------------------------------------------- densities

BERT_LAYER = {
    "query": (1024, 1024),
    "key": (1024, 1024),
    "value": (1024, 1024),
    "attention_output": (1024, 1024),
    "intermediate": (4096, 1024),
    "output": (1024, 4096),
}


def total(shapes):
    return sum(math.prod(s) for s in shapes.values())


def test_uniform_densities():
    assert uniform_densities(BERT_LAYER, 0.1) == {name: 0.1 for name in BERT_LAYER}
    counts = active_counts(BERT_LAYER, uniform_densities(BERT_LAYER, 0.1))
    assert counts["query"] == math.floor(0.1 * 1024 * 1024 + 0.5)
    with pytest.raises(ValueError, match="density"):
        uniform_densities(BERT_LAYER, 0.0)
    with pytest.raises(ValueError, match="density"):
        uniform_densities(BERT_LAYER, 1.5)


def test_erk_balances_total_and_follows_formula():
    shapes = dict(BERT_LAYER, classifier=(2, 1024), pooler=(1024, 1024))
    for density in (0.02, 0.1, 0.3, 0.5):
        densities = erk_densities(shapes, density)
        assert list(densities) == list(shapes)
        assert all(0.0 < d <= 1.0 for d in densities.values())
        exact_total = sum(densities[n] * math.prod(s) for n, s in shapes.items())
        assert exact_total == pytest.approx(density * total(shapes), rel=1e-12)
        counts = active_counts(shapes, densities)
        target = math.floor(density * total(shapes) + 0.5)
        assert abs(sum(counts.values()) - target) <= len(shapes) / 2 + 1
        ratios = {
            densities[n] / ((sum(s) / math.prod(s))) for n, s in shapes.items() if densities[n] < 1.0
        }
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
        # ERK keeps thin layers denser than square ones of the same size.
        assert densities["intermediate"] < densities["query"] or densities["query"] == 1.0


def test_erk_makes_tiny_layers_dense_and_rebalances():
    shapes = {"big": (1000, 1000), "tiny": (2, 3), "small": (10, 20)}
    densities = erk_densities(shapes, 0.1)
    assert densities["tiny"] == 1.0 and densities["small"] == 1.0
    # Dense layers are taken out of the budget: the big layer carries the rest exactly.
    assert densities["big"] * 1e6 + 6 + 200 == pytest.approx(0.1 * total(shapes), rel=1e-12)


def test_erk_power_scale_zero_is_uniform_and_density_one_is_dense():
    assert erk_densities(BERT_LAYER, 0.2, power_scale=0.0) == pytest.approx(uniform_densities(BERT_LAYER, 0.2))
    assert erk_densities(BERT_LAYER, 1.0) == {name: 1.0 for name in BERT_LAYER}
    with pytest.raises(ValueError, match="power_scale"):
        erk_densities(BERT_LAYER, 0.2, power_scale=-1.0)
    with pytest.raises(ValueError, match="empty"):
        erk_densities({}, 0.2)
    with pytest.raises(ValueError, match="'bad'"):
        erk_densities({"bad": (0, 3)}, 0.2)


def test_active_counts_rounds_half_up_and_checks_names():
    shapes = {"a": (2,), "b": (2,), "c": (10,)}
    assert active_counts(shapes, {"a": 0.25, "b": 0.75, "c": 1.0}) == {"a": 1, "b": 2, "c": 10}
    with pytest.raises(ValueError, match="different parameters"):
        active_counts(shapes, {"a": 0.5})
    with pytest.raises(ValueError, match="'a'"):
        active_counts(shapes, {"a": 1.5, "b": 0.5, "c": 0.5})


# ---------------------------------------------------------------- packing and fingerprints


def test_pack_unpack_round_trip_and_numpy_layout():
    g = torch.Generator().manual_seed(0)
    for shape in [(0,), (1,), (7,), (8,), (9,), (3, 5), (16, 33), (2, 3, 4)]:
        mask = torch.rand(shape, generator=g) < 0.3
        packed, packed_shape = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert packed_shape == shape
        assert np.array_equal(packed.numpy(), np.packbits(mask.reshape(-1).numpy()))
        assert torch.equal(unpack_mask(packed, packed_shape), mask)


def test_unpack_rejects_wrong_size_and_dirty_padding():
    packed, shape = pack_mask(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs 2"):
        unpack_mask(packed, (16,))
    with pytest.raises(ValueError, match="padding"):
        unpack_mask(torch.tensor([255], dtype=torch.uint8), shape)
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.ones(3))


def test_fingerprint_equal_masks_equal_and_every_bit_flip_differs():
    mask = torch.rand(6, 11, generator=torch.Generator().manual_seed(3)) < 0.5
    fp = mask_fingerprint(mask)
    assert 0 <= fp < 2**63
    assert fp == mask_fingerprint(mask.clone()) == mask_fingerprint(mask.t().contiguous().t())
    flipped = set()
    for i in range(mask.numel()):
        other = mask.clone().reshape(-1)
        other[i] = ~other[i]
        flipped.add(mask_fingerprint(other.reshape(mask.shape)))
    assert fp not in flipped and len(flipped) == mask.numel()
    assert mask_fingerprint(mask.reshape(11, 6)) != fp
    # Same bits padded differently: 8 zeros vs 16 zeros pack to different byte counts, and
    # shape is hashed too.
    assert mask_fingerprint(torch.zeros(8, dtype=torch.bool)) != mask_fingerprint(torch.zeros(2, 4, dtype=torch.bool))
    assert torch.tensor([fp], dtype=torch.int64).item() == fp


# -- tie order ----------------------------------------------------------------------------------

@pytest.mark.parametrize("numel", [1, 2, 3, 1000, 4097, 1 << 16])
def test_tie_order_is_a_permutation_of_its_range(numel):
    bits = tie_order_bits(numel)
    keys = tie_order(torch.arange(1 << bits), salt=stable_seed(1, 2, 3), bits=bits)
    assert torch.equal(keys.sort().values, torch.arange(1 << bits))


def test_tie_order_stays_injective_where_int64_products_wrap():
    """BERT-large FFN weights need 22 bits; bigger tensors up to 62 bits, where the products
    overflow int64: distinct indices must still get distinct keys."""
    g = torch.Generator().manual_seed(0)
    for bits in (22, 40, 62):
        idx = torch.unique(torch.randint(0, 1 << min(bits, 62), (200_000,), generator=g))
        keys = tie_order(idx, salt=stable_seed(9, 9, 9), bits=bits)
        assert torch.unique(keys).numel() == idx.numel()
        assert int(keys.min()) >= 0 and int(keys.max()) < (1 << bits)


def test_ties_at_the_threshold_are_spread_over_the_weight_not_taken_from_its_first_rows():
    """A weight whose scores all tie (bf16-like): by index, the first k positions (the first
    heads) would be kept every time; by the seeded tie order the kept set is spread over the
    rows, changes with the salt, and still has exactly k elements."""
    from dist_sparse.masks import tie_order, tie_order_bits
    from dist_sparse.sparsity.select import LOCAL, Part, distributed_topk, sortable_keys

    rows, cols, k = 64, 32, 512
    scores = torch.ones(rows * cols)
    bits = tie_order_bits(scores.numel())
    masks = []
    for salt in (stable_seed(1, 10, 0), stable_seed(1, 20, 0)):
        part = Part(sortable_keys(scores), torch.ones_like(scores, dtype=torch.bool), lambda pos: pos,
                    scores.numel(), salt)
        [mask] = distributed_topk([part], [k], group=LOCAL)
        assert int(mask.sum()) == k
        per_row = mask.view(rows, cols).sum(dim=1)
        assert int(per_row[: rows // 2].sum()) not in (0, k)  # not all in either half
        assert 0.35 < int(per_row[: rows // 2].sum()) / k < 0.65
        masks.append(mask)
    assert not torch.equal(masks[0], masks[1])
    # the order over ties is exactly the tie keys' order: the k smallest keys win
    keys = tie_order(torch.arange(scores.numel()), stable_seed(1, 20, 0), bits)
    want = torch.zeros_like(masks[1])
    want[keys.argsort()[:k]] = True
    assert torch.equal(masks[1], want)
