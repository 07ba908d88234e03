"""What the sparsifier's stateful side costs per step and per install, counted with
``dist_sparse.costs.count_costs`` on the fake layout (``dist_sparse.sparsity.fake``).

The counts that matter on a GPU are the host synchronisations (the host waits for the device)
and the number of kernels: a fixed-mask step must not wait at all, an install must wait a fixed
number of times whatever the number of sparse weights, and the gradient masking must launch a
fixed number of kernels (ZeRO-3) or one per weight with nothing else allocated (ZeRO-1/2 hook).
Counting runs on the calling thread, so every simulated rank counts its own work.
"""

import subprocess
import sys

import pytest
import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.costs import count_costs
from dist_sparse.sparsifier import UpdateStats, bf16_all_reduce_bytes
from dist_sparse.sparsity.fake import FakeWorld
from dist_sparse.sparsity.layout import mask_fingerprints

STATIC = {"method": "static", "sparsity": 0.75}
RIGL = {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0, "drop_fraction": 0.5}


SHAPE = (16, 12)
# RigL's budget is per weight, its decision's agreement a fixed number of small all-reduces per
# weight: compare them at a size where weights are weights (bert-mini's FFN is 256 x 1024).
RIGL_SHAPE = (64, 128)


def weights(layers: int, shape=SHAPE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(layers)
    return {f"w{i}": torch.randn(shape, generator=g) for i in range(layers)}


def prepared(layers: int, dp: int, stage: int, section=STATIC, dtype=torch.float32, steps: int = 8, shape=SHAPE):
    world = FakeWorld(weights(layers, shape), dp=dp, stage=stage, dtype=dtype)
    sps = world.sparsifiers(SparsityConfig(**section), max_steps=steps)
    world.run(lambda rank: sps[rank].prepare())
    return world, sps


@pytest.mark.parametrize("dp,stage", [(1, 2), (2, 2), (2, 3)])
def test_a_fixed_mask_step_never_waits_for_the_device(dp, stage):
    world, sps = prepared(4, dp, stage)

    def fixed_step(rank):
        with count_costs() as c:
            sps[rank].before_step(1)
            sps[rank].mask_gradients()
            assert sps[rank].step(1) is None
        return c

    for c in world.run(fixed_step):
        assert c.host_syncs == 0, c.summary()
        assert c.collectives == 0, c.summary()


@pytest.mark.parametrize("layers", [2, 8])
def test_zero3_masks_every_gradient_partition_in_one_kernel_without_waiting(layers):
    world, sps = prepared(layers, 2, 3)
    for name in world.names:
        world.set_gradient(name, torch.ones(SHAPE))

    def masking(rank):
        with count_costs() as c:
            sps[rank].mask_gradients()
        return c

    for rank, c in enumerate(world.run(masking)):
        assert (c.host_syncs, c.kernels, c.allocations) == (0, 1, 0), c.summary()
        for t in sps[rank].targets:
            start, stop = sps[rank].layout.held_range(t)
            got = world._grads[rank][t.name][start:stop]
            # the gradient was all ones: it is now the mask, exactly
            assert torch.equal(got, sps[rank].masks[t.name].float())


def test_the_zero12_gradient_hook_is_one_masked_fill():
    world, sps = prepared(3, 1, 2)
    sp = sps[0]
    for t in sp.targets:
        (hook,) = t.param._backward_hooks.values()
        grad = torch.randn(t.param.shape)
        with count_costs() as c:
            out = hook(grad)
        assert (c.host_syncs, c.kernels, c.allocations, dict(c.ops)) == (0, 1, 1, {"masked_fill": 1}), c.summary()
        assert torch.equal(out, torch.where(sp.masks[t.name], grad, torch.zeros_like(grad)))
        assert sp.masks[t.name].device == t.param.device


def install_costs(layers: int, dp: int, stage: int):
    """Costs of re-installing every mask (install, account, verify) on every rank."""
    world, sps = prepared(layers, dp, stage)

    def reinstall(rank):
        sp = sps[rank]
        masks = {n: m.clone() for n, m in sp.masks.items()}
        with count_costs() as c:
            sp._install(masks, UpdateStats(step=1), dict(sp.masks))
        sp.history.pop()
        return c

    return world.run(reinstall)


@pytest.mark.parametrize("dp,stage", [(1, 2), (2, 2), (2, 3), (3, 1)])
def test_install_account_and_verify_wait_as_often_for_eight_weights_as_for_two(dp, stage):
    two, eight = install_costs(2, dp, stage), install_costs(8, dp, stage)
    for a, b in zip(two, eight):
        assert a.host_syncs == b.host_syncs, (a.summary(), b.summary())
        assert a.collectives == b.collectives, (a.summary(), b.summary())
        # one read of the counts, and with replicated masks over 2+ ranks one of the fingerprints
        assert a.host_syncs == 1 + (dp > 1 and stage < 3), a.summary()


@pytest.mark.parametrize("dp,stage,dtype", [(2, 2, torch.float32), (2, 2, torch.bfloat16), (3, 1, torch.bfloat16)])
def test_rigl_at_zero12_reads_gradient_fragments_and_sends_less_than_a_bf16_all_reduce(dp, stage, dtype):
    layers = 4
    world, sps = prepared(layers, dp, stage, section=RIGL, dtype=dtype, shape=RIGL_SHAPE)
    g = torch.Generator().manual_seed(7)
    for name in world.names:
        world.set_gradient(name, torch.randn(RIGL_SHAPE, generator=g))
    reduced = {name: world._grads[0][name].clone() for name in world.names}
    before = {name: m.clone().reshape(-1).float() for name, m in sps[0].masks.items()}

    def update(rank):
        sp = sps[rank]
        sp.before_step(2)
        with count_costs() as c:
            sp.mask_gradients()
        stats = sp.step(2)
        return c, stats, {n: m.clone() for n, m in sp.masks.items()}

    results = world.run(update)
    budget = bf16_all_reduce_bytes([RIGL_SHAPE[0] * RIGL_SHAPE[1]] * layers, dp)
    for rank, (c, stats, masks) in enumerate(results):
        assert c.collectives == 0 and c.host_syncs == 0, c.summary()
        assert stats is not None and stats.apply_bytes == 0
        assert 0 < stats.apply_bytes + stats.sync_bytes <= budget, (stats, budget)
        for name in world.names:
            assert torch.equal(masks[name], results[0][2][name])
    # the gradient the optimizer reads is the reduced one, masked by the mask of this step's
    # start, on the fragment each rank owns
    for rank, zero in enumerate(world.zeros):
        for t in world.targets[rank]:
            start, stop = zero._fragments[t.name]
            assert torch.equal(world._grads[rank][t.name][start:stop],
                               reduced[t.name][start:stop] * before[t.name][start:stop])


def test_fingerprints_separate_bits_and_shapes_and_agree_across_processes():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(7, 9, generator=g) > 0.5
    (fp,) = mask_fingerprints([mask]).tolist()
    assert mask_fingerprints([mask.clone()]).tolist() == [fp]
    flipped = set()
    for i in range(mask.numel()):
        other = mask.clone().reshape(-1)
        other[i] = ~other[i]
        flipped.add(mask_fingerprints([other.reshape(mask.shape)]).item())
    assert len(flipped) == mask.numel() and fp not in flipped
    assert mask_fingerprints([mask.reshape(9, 7)]).item() != fp
    assert mask_fingerprints([torch.zeros(8, dtype=torch.bool)]).item() != \
        mask_fingerprints([torch.ones(8, dtype=torch.bool)]).item()
    # no per-process salt: another interpreter computes the same value
    code = ("import torch; from dist_sparse.sparsity.layout import mask_fingerprints; "
            "g = torch.Generator().manual_seed(3); m = torch.rand(7, 9, generator=g) > 0.5; "
            "print(mask_fingerprints([m]).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) == fp


@pytest.mark.parametrize("layers", [2, 8])
def test_rigl_at_zero3_reads_every_partition_without_waiting(layers):
    world, sps = prepared(layers, 2, 3, section=RIGL)
    g = torch.Generator().manual_seed(5)
    for name in world.names:
        world.set_gradient(name, torch.randn(SHAPE, generator=g))
    reduced = {name: world._grads[0][name].clone() for name in world.names}

    def read(rank):
        sps[rank].before_step(2)
        with count_costs() as c:
            sps[rank].mask_gradients()
        return c

    for rank, c in enumerate(world.run(read)):
        # one |g| per weight, one fused masking
        assert (c.host_syncs, c.collectives, c.kernels) == (0, 0, layers + 1), c.summary()
        for t in sps[rank].targets:
            start, stop = sps[rank].layout.held_range(t)
            assert torch.equal(sps[rank]._grad_scores[t.name], reduced[t.name][start:stop].abs())
            assert torch.equal(world._grads[rank][t.name][start:stop],
                               reduced[t.name][start:stop] * sps[rank].masks[t.name])
