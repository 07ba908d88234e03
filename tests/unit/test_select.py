"""Count-only top-k (dist_sparse.sparsity.select): the direct LOCAL selection, the batched
bisection over one holder, and over slices held by several ranks (threads standing in for
processes, ``sparsity.fake``), all bit for bit a plain sort by (score desc, seeded tie key asc),
each with one device-to-host read per call whatever the number of tensors."""

import pytest
import torch

from dist_sparse.costs import count_costs
from dist_sparse.masks.topk import stable_seed, tie_order, tie_order_bits
from dist_sparse.sparsity.fake import FakeCollectives, ThreadGroup
from dist_sparse.sparsity.select import SCORE_ROUNDS, LOCAL, Part, SelectStats, distributed_topk, keys_and_nans, \
    sortable_keys

SHAPES = [(37, 11), (8, 64), (5, 5), (64, 48), (1, 7), (30, 30)]


def salt_of(i: int) -> int:
    return stable_seed(0, 7, i)


def tied_problem(shape, seed):
    """Scores with few distinct values (many ties, both signs, -0.0 and +0.0) and an eligibility mask."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-3, 4, shape, generator=g).float() * 0.5)
    scores[torch.rand(shape, generator=g) < 0.1] = -0.0
    eligible = torch.rand(shape, generator=g) < 0.7
    return scores, eligible


def reference(scores, eligible, k, salt, index=None):
    """The k best eligible positions by score, equal scores by the seeded tie key of their
    global index (``index``: position -> global index; default the position itself)."""
    flat, elig = (scores.flatten() + 0.0).tolist(), eligible.flatten().tolist()
    positions = torch.arange(len(flat))
    keys = tie_order(positions if index is None else index(positions), salt, tie_order_bits(len(flat))).tolist()
    order = sorted((i for i in range(len(flat)) if elig[i]), key=lambda i: (-flat[i], keys[i]))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(scores.shape)


def ks_for(eligible, seed):
    g = torch.Generator().manual_seed(seed)
    total = int(eligible.sum())
    return [0, total, int(torch.randint(0, total + 1, (1,), generator=g))]


def whole_parts(problems, index_of=None):
    parts = []
    for i, (scores, eligible) in enumerate(problems):
        gidx = index_of[i] if index_of else (lambda pos: pos)
        parts.append(Part(sortable_keys(scores).flatten(), eligible.flatten(), gidx, scores.numel(), salt_of(i)))
    return parts


@pytest.mark.parametrize("group", [LOCAL, None], ids=["local", "bisection"])
@pytest.mark.parametrize("pick", range(3))
def test_selection_of_many_tensors_equals_the_per_tensor_reference(group, pick):
    """LOCAL selects directly; group None (one holder, no process group) runs the batched
    bisection. Both give exactly the reference of every tensor."""
    problems = [tied_problem(shape, seed) for seed, shape in enumerate(SHAPES)]
    ks = [ks_for(e, seed)[pick] for seed, (_, e) in enumerate(problems)]
    stats = SelectStats()
    got = distributed_topk(whole_parts(problems), ks, group=group, stats=stats)
    for i, ((scores, eligible), k, mask) in enumerate(zip(problems, ks, got)):
        assert torch.equal(mask.view(scores.shape), reference(scores, eligible, k, salt_of(i)))
    assert stats.allreduces == 0  # nobody to talk to either way
    if group is LOCAL:
        assert stats.rounds == 0  # no bisection at all


def test_local_selection_breaks_ties_by_global_index_not_local_position():
    """The tie keys come from the logical index: with a local order that is not the global one
    (a reversed mapping) the direct selection still agrees with the bisection."""
    scores, eligible = tied_problem((23, 9), 7)
    n = scores.numel()
    reverse = [lambda pos: n - 1 - pos]
    for k in ks_for(eligible, 3):
        local = distributed_topk(whole_parts([(scores, eligible)], reverse), [k], group=LOCAL)[0]
        bisected = distributed_topk(whole_parts([(scores, eligible)], reverse), [k], group=None)[0]
        assert torch.equal(local, bisected) and int(local.sum()) == k
        assert torch.equal(local, reference(scores, eligible, k, salt_of(0), reverse[0]).flatten())


def zero3_slices(numel, ranks):
    part = -(-numel // ranks)
    return [(min(r * part, numel), min(r * part + part, numel)) for r in range(ranks)]


def sliced_selection(problems, ks, ranks, at_most=False):
    """Every tensor cut into ZeRO-3-like flat slices, one per rank; returns (whole masks, stats
    per rank, each with ``host_syncs``: what ``count_costs`` counted on that rank's thread)."""
    group = ThreadGroup(ranks)

    def on_rank(rank):
        parts = []
        for i, (scores, eligible) in enumerate(problems):
            start, stop = zero3_slices(scores.numel(), ranks)[rank]
            parts.append(Part(sortable_keys(scores).flatten()[start:stop], eligible.flatten()[start:stop],
                              lambda pos, start=start: pos + start, scores.numel(), salt_of(i)))
        stats = SelectStats()
        with count_costs() as costs:
            masks = distributed_topk(parts, ks, group=group, stats=stats, collectives=FakeCollectives(group, rank),
                                     at_most=at_most)
        stats.host_syncs = costs.host_syncs
        return masks, stats

    out = group.run(on_rank)
    masks = [torch.cat([masks[i] for masks, _ in out]) for i in range(len(problems))]
    return masks, [stats for _, stats in out]


@pytest.mark.parametrize("ranks", [2, 3])
def test_sliced_selection_over_ranks_equals_the_per_tensor_reference(ranks):
    problems = [tied_problem(shape, seed) for seed, shape in enumerate(SHAPES)]
    for pick in range(3):
        ks = [ks_for(e, seed)[pick] for seed, (_, e) in enumerate(problems)]
        masks, stats = sliced_selection(problems, ks, ranks)
        for i, ((scores, eligible), k, mask) in enumerate(zip(problems, ks, masks)):
            assert torch.equal(mask.view(scores.shape), reference(scores, eligible, k, salt_of(i)))
        # one all-reduce per round and one for the checks, the same on every rank
        assert all(s == stats[0] for s in stats)
        assert stats[0].allreduces == stats[0].rounds + 1


def test_rounds_collectives_and_host_reads_do_not_grow_with_the_number_of_tensors():
    """All tensors of a call share every round: a fixed number of rounds (32 over the score key,
    one for the count above the k-th key, then one per bit of the tie keys), each one all-reduce
    of one int64 per tensor, and one device-to-host read per call (what ``count_costs`` counts
    on every rank), whether there is one tensor or twelve of the same size."""
    def run(count):
        problems = [tied_problem((40, 25), seed) for seed in range(count)]
        ks = [int(e.sum()) // 3 for _, e in problems]
        masks, stats = sliced_selection(problems, ks, 2)
        for i, ((scores, eligible), k, mask) in enumerate(zip(problems, ks, masks)):
            assert torch.equal(mask.view(scores.shape), reference(scores, eligible, k, salt_of(i)))
        return stats

    one, twelve = run(1), run(12)
    assert twelve[0].rounds == one[0].rounds == SCORE_ROUNDS + 1 + tie_order_bits(1000)
    assert twelve[0].allreduces == one[0].allreduces == one[0].rounds + 1
    assert twelve[0].bytes == 12 * one[0].bytes  # the vector grows, not the number of messages
    for stats in one + twelve:
        assert stats.host_reads == 1 and stats.host_syncs == 1, stats


@pytest.mark.parametrize("group", [LOCAL, None], ids=["local", "bisection"])
def test_one_host_read_per_call_whatever_the_number_of_tensors(group):
    """Counted at the dispatcher (``costs.count_costs``): one host sync for 1 or 12 tensors, also
    with lazily computed keys (LOCAL computes them tensor by tensor), and ``SelectStats``
    reports the same number."""
    def run(count):
        problems = [tied_problem((40, 25), seed) for seed in range(count)]
        ks = [int(e.sum()) // 3 for _, e in problems]
        parts = [Part(lambda s=s: keys_and_nans(s), e.flatten(), lambda pos: pos, s.numel(), salt_of(i))
                 for i, (s, e) in enumerate(problems)]
        stats = SelectStats()
        with count_costs() as costs:
            masks = distributed_topk(parts, ks, group=group, stats=stats, at_most=True)
        for i, ((scores, eligible), k, mask) in enumerate(zip(problems, ks, masks)):
            assert torch.equal(mask.view(scores.shape), reference(scores, eligible, k, salt_of(i)))
        assert stats.host_reads == costs.host_syncs, costs.summary()
        return costs.host_syncs

    assert run(1) == run(12) == 1


def bf16_problem(shape, seed, ineligible=0.3):
    """Gaussian scores rounded to bf16 (thousands of ties among a few hundred values) and an
    eligibility mask."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g).bfloat16().float()
    return scores, torch.rand(shape, generator=g) >= ineligible


@pytest.mark.parametrize("where", ["local", "bisection", "ranks3"])
def test_bf16_ties_ineligible_and_at_most_equal_the_reference(where):
    """Every k from 0 to all eligible, and with ``at_most`` ks beyond the eligible count (all
    eligible taken, ``chosen`` says how many): the plain sort's set, on one holder alone, in the
    bisection, and over three ranks' ZeRO-3 slices."""
    problems = [bf16_problem(shape, 10 + seed) for seed, shape in enumerate([(64, 96), (33, 17), (1, 5), (128, 8)])]
    eligible_counts = [int(e.sum()) for _, e in problems]
    for pick in (lambda e: 0, lambda e: e, lambda e: e // 2, lambda e: e + 5, lambda e: 10 ** 6):
        ks = [pick(e) for e in eligible_counts]
        if where == "ranks3":
            masks, stats = sliced_selection(problems, ks, 3, at_most=True)
            stats = stats[0]
        else:
            stats = SelectStats()
            masks = distributed_topk(whole_parts(problems), ks, group=LOCAL if where == "local" else None,
                                     stats=stats, at_most=True)
        assert stats.chosen == [min(k, e) for k, e in zip(ks, eligible_counts)]
        for i, ((scores, eligible), k, mask) in enumerate(zip(problems, stats.chosen, masks)):
            assert torch.equal(mask.view(scores.shape), reference(scores, eligible, k, salt_of(i))), (i, k)


def test_a_nan_on_one_rank_stops_every_rank():
    scores, eligible = tied_problem((10, 10), 1)
    group = ThreadGroup(2)

    def on_rank(rank):
        keys_scores = scores.flatten()[rank * 50:(rank + 1) * 50].clone()
        if rank == 1:
            keys_scores[3] = float("nan")
        part = Part(sortable_keys(keys_scores), eligible.flatten()[rank * 50:(rank + 1) * 50],
                    lambda pos: pos + rank * 50, 100, salt_of(0), nan_count=int(torch.isnan(keys_scores).sum()))
        try:
            distributed_topk([part], [5], group=group, collectives=FakeCollectives(group, rank))
        except ValueError as err:
            return str(err)
        return "no error"

    assert all(msg.startswith("mask scores contain NaN (1 values)") for msg in group.run(on_rank))


@pytest.mark.parametrize("group", [LOCAL, None], ids=["local", "bisection"])
@pytest.mark.parametrize("seed", range(4))
def test_a_k_beyond_the_eligible_count_is_refused(seed, group):
    scores, eligible = tied_problem((37, 11), seed)
    part = Part(sortable_keys(scores).flatten(), eligible.flatten(), lambda p: p, scores.numel(), salt_of(0))
    with pytest.raises(ValueError, match=f"cannot select {int(eligible.sum()) + 1} of {int(eligible.sum())} "):
        distributed_topk([part], [int(eligible.sum()) + 1], group=group)
    with pytest.raises(ValueError, match="negative"):
        distributed_topk([part], [-1], group=group)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group", [LOCAL, None], ids=["local", "bisection"])
def test_on_cuda_the_same_masks_with_one_host_sync(group):
    """On the GPU (int64 keys wrapping, torch.topk's CUDA kernel, device-side bisection) the
    masks are the CPU reference's, and the dispatcher sees one host sync per call."""
    problems = [bf16_problem(shape, seed) for seed, shape in enumerate(SHAPES)]
    ks = [int(e.sum()) // 3 for _, e in problems]
    parts = [Part(sortable_keys(s).flatten().cuda(), e.flatten().cuda(), lambda pos: pos, s.numel(), salt_of(i))
             for i, (s, e) in enumerate(problems)]
    torch.cuda.synchronize()
    with count_costs() as costs:
        masks = distributed_topk(parts, ks, group=group)
    assert costs.host_syncs == 1, costs.summary()
    for i, ((scores, eligible), k, mask) in enumerate(zip(problems, ks, masks)):
        assert mask.is_cuda and torch.equal(mask.cpu().view(scores.shape), reference(scores, eligible, k, salt_of(i)))
