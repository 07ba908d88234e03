"""Resumable, data-parallel-sharded batch iterator."""

import itertools

import pytest
import torch

from dist_sparse.data.loader import ResumableBatchIterator


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def test_ranks_draw_distinct_slices_of_the_global_batch():
    num, mbs, dp, seed = 103, 4, 3, 11
    iterators = [ResumableBatchIterator(num, mbs, r, dp, seed) for r in range(dp)]
    per_epoch = num // (mbs * dp)
    assert iterators[0].batches_per_epoch == per_epoch == 8
    order0 = torch.randperm(num, generator=torch.Generator().manual_seed(seed)).tolist()
    order1 = torch.randperm(num, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    for step in range(2 * per_epoch):
        batches = [next(it) for it in iterators]
        assert all(len(b) == mbs for b in batches)
        union = [i for b in batches for i in b]
        assert len(set(union)) == mbs * dp  # no example on two ranks
        order, pos = (order0, step) if step < per_epoch else (order1, step - per_epoch)
        assert union == order[pos * mbs * dp : (pos + 1) * mbs * dp]  # rank r takes slice r
    assert iterators[0].epoch == 1


def test_epoch_covers_every_example_once_then_reshuffles():
    it = ResumableBatchIterator(48, 8, 0, 1, seed=0)
    epoch0 = [i for b in take(it, 6) for i in b]
    epoch1 = [i for b in take(it, 6) for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(48))
    assert epoch0 != epoch1


def test_resume_continues_the_same_sequence():
    reference = ResumableBatchIterator(50, 3, 1, 2, seed=5)
    expected = take(reference, 40)  # crosses several epoch boundaries
    for cut in (0, 1, 7, 8, 9, 23):
        first = ResumableBatchIterator(50, 3, 1, 2, seed=5)
        head = take(first, cut)
        state = first.state_dict()
        assert {"epoch", "position", "seed"} <= set(state)
        resumed = ResumableBatchIterator(50, 3, 1, 2, seed=5)
        resumed.load_state_dict(state)
        assert head + take(resumed, 40 - cut) == expected
    # a state saved on another rank restores this rank too (it is rank-independent)
    other = ResumableBatchIterator(50, 3, 0, 2, seed=5)
    take(other, 9)
    resumed = ResumableBatchIterator(50, 3, 1, 2, seed=5)
    resumed.load_state_dict(other.state_dict())
    assert take(resumed, 5) == expected[9:14]


def test_resume_with_different_setup_is_an_error():
    state = ResumableBatchIterator(50, 3, 0, 2, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed was 5"):
        ResumableBatchIterator(50, 3, 0, 2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size was 6"):
        ResumableBatchIterator(50, 4, 0, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples was 50"):
        ResumableBatchIterator(51, 3, 0, 2, seed=5).load_state_dict(state)


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global micro batch"):
        ResumableBatchIterator(7, 4, 0, 2, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        ResumableBatchIterator(70, 4, 2, 2, seed=0)
    ResumableBatchIterator(8, 4, 1, 2, seed=0)  # exactly one global batch is enough


def test_keep_last_fills_the_last_batch_from_the_epoch_start():
    num, mbs, dp = 10, 2, 2
    its = [ResumableBatchIterator(num, mbs, r, dp, seed=3, drop_last=False) for r in range(dp)]
    assert its[0].batches_per_epoch == 3
    order = its[0].epoch_order(0).tolist()
    batches = [[next(it) for it in its] for _ in range(3)]
    flat = [i for step in batches for b in step for i in b]
    assert flat == order + order[:2]  # every example once, then padding from the start
    assert next(its[0]) == its[0].epoch_order(1)[:2].tolist()


def step_samples(layout, steps, num=103, step_batch=24, seed=7, drop_last=True, start=None):
    """The samples of each optimizer step, in the order of their place in the step's global batch
    (micro step major, then data-parallel rank), at layout (micro batch, dp size)."""
    micro, dp = layout
    acc = step_batch // (micro * dp)
    its = [ResumableBatchIterator(num, micro, r, dp, seed, drop_last=drop_last, step_batch=step_batch)
           for r in range(dp)]
    if start is not None:
        for it in its:
            it.load_state_dict(start, relayout=True)
    return [[i for _ in range(acc) for it in its for i in next(it)] for _ in range(steps)], its[0].state_dict()


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_step_holds_the_same_samples_at_every_layout(drop_last):
    # 103 examples, 24 per step: 4 steps per epoch (dropped: 7) or 5 (the last filled from the start)
    reference, _ = step_samples((4, 2), 12, drop_last=drop_last)
    for layout in ((4, 1), (2, 3), (8, 3), (3, 8), (6, 2)):
        assert step_samples(layout, 12, drop_last=drop_last)[0] == reference, layout
    per_epoch = 4 if drop_last else 5
    assert ResumableBatchIterator(103, 4, 0, 2, 7, drop_last=drop_last, step_batch=24).batches_per_epoch == \
        per_epoch * 3


def test_resume_at_another_layout_continues_from_the_same_sample():
    reference, _ = step_samples((4, 2), 11)
    first, state = step_samples((4, 2), 6)       # 6 steps at DP 2 (2 micro batches each)...
    assert state["samples"] == (6 - 4) * 24      # ...4 steps make an epoch: 2 steps into the second
    for layout in ((4, 1), (2, 3), (8, 3)):      # ...then 5 more at another layout
        rest, _ = step_samples(layout, 5, start=state)
        assert first + rest == reference, layout


def test_resume_at_another_layout_refuses_another_step_batch_or_a_partial_micro_batch():
    state = ResumableBatchIterator(103, 4, 0, 2, 7, step_batch=24).state_dict()
    with pytest.raises(ValueError, match="step_batch was 24 in the checkpoint but is 48 now"):
        ResumableBatchIterator(103, 4, 0, 2, 7, step_batch=48).load_state_dict(state, relayout=True)
    state["samples"] = 12
    with pytest.raises(ValueError, match="12 samples of the epoch were consumed, not a whole number"):
        ResumableBatchIterator(103, 8, 0, 3, 7, step_batch=24).load_state_dict(state, relayout=True)
    old = {k: v for k, v in state.items() if k not in ("samples", "step_batch")}  # written before
    with pytest.raises(ValueError, match="predates sample-based data positions"):
        ResumableBatchIterator(103, 4, 0, 1, 7, step_batch=24).load_state_dict(old, relayout=True)
    # without relayout the micro batch layout must be the same, as before
    with pytest.raises(ValueError, match="global_batch_size was 8"):
        ResumableBatchIterator(103, 4, 0, 1, 7, step_batch=24).load_state_dict(state)
