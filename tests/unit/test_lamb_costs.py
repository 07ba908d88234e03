"""LAMB in a handful of kernels: the multi-tensor path (groups of whole tensors) and the flat
path (a ZeRO partition cut into its tensors' runs by ``Segments``) both equal a plain per-tensor
LAMB, make no host sync, and launch the same number of kernels whatever the number of layers."""

import pytest
import torch

from dist_sparse.costs import count_costs
from dist_sparse.optim import Lamb, Segments, parameter_groups

BETAS, EPS, LR, WD = (0.9, 0.999), 1e-6, 0.01, 0.01


def reference_step(params, grads, states, step, wd, l1=0.0, lo=0.01, hi=10.0):
    """FusedLamb's rule, one tensor at a time, as written in the paper."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g + l1 * torch.sign(p) if l1 else g
        m, v = states.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        states[i] = (m, v)
        update = (m / (1 - BETAS[0] ** step)) / ((v / (1 - BETAS[1] ** step)).sqrt() + EPS) + wd * p
        w_norm, u_norm = p.norm(), update.norm()
        trust = (w_norm / u_norm).clamp(lo, hi) if w_norm > 0 and u_norm > 0 else torch.tensor(1.0)
        p -= LR * trust * update


def model(layers: int) -> torch.nn.Module:
    torch.manual_seed(layers)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 8)]
    net = torch.nn.Sequential(*mods)
    with torch.no_grad():
        net[0].bias.zero_()  # a zero tensor: its trust ratio is 1
    return net


def grads_for(net, step):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}


@pytest.mark.parametrize("l1", [0.0, 1e-3])
def test_multi_tensor_lamb_equals_the_per_tensor_rule(l1):
    net = model(2)
    groups = parameter_groups(net, WD, one_per_parameter=False)
    if l1:  # the LayerNorm weights stand in for slimming coefficients
        groups[1]["l1"] = l1
    opt = Lamb(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ref = {g_i: [p.detach().clone() for p in g["params"]] for g_i, g in enumerate(groups)}
    states = {g_i: {} for g_i in ref}
    for step in range(1, 5):
        grads = grads_for(net, step)
        by_name = dict(net.named_parameters())
        for g_i, group in enumerate(groups):
            for name in group["names"]:
                by_name[name].grad = grads[name].clone()
            reference_step(ref[g_i], [grads[n] for n in group["names"]], states[g_i], step, group["weight_decay"],
                           group.get("l1", 0.0))
        opt.step()
    for g_i, group in enumerate(groups):
        for p, want in zip(group["params"], ref[g_i]):
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


def flat_problem(layers: int, pad: int = 3):
    """One flat 'partition' holding every tensor of a model back to back with ``pad`` elements of
    padding after each, as ZeRO's alignment leaves them, and its Segments."""
    net = model(layers)
    tensors = [p.detach().clone() for p in net.parameters()]
    lengths, rows, chunks = [], [], []
    for i, t in enumerate(tensors):
        lengths += [t.numel(), pad]
        rows += [i, -1]
        chunks += [t.flatten(), torch.zeros(pad)]
    flat = torch.nn.Parameter(torch.cat(chunks))
    return tensors, flat, Segments(lengths, rows)


def test_flat_partition_lamb_equals_the_per_tensor_rule_and_keeps_padding_zero():
    tensors, flat, segments = flat_problem(2)
    opt = Lamb([{"params": [flat], "names": [f"t{i}" for i in range(len(tensors))], "weight_decay": WD}],
               lr=LR, betas=BETAS, eps=EPS)
    opt.segments = {id(flat): segments}
    states = {}
    for step in range(1, 5):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(t.shape, generator=g) for t in tensors]
        flat.grad = torch.cat([torch.cat([x.flatten(), torch.zeros(3)]) for x in grads])
        reference_step(tensors, grads, states, step, WD)
        opt.step()
    at = 0
    for t in tensors:
        torch.testing.assert_close(flat.detach()[at:at + t.numel()].view_as(t), t, rtol=1e-6, atol=1e-7)
        assert torch.equal(flat.detach()[at + t.numel():at + t.numel() + 3], torch.zeros(3))
        at += t.numel() + 3


def test_zero_gradient_and_zero_moments_keep_a_pruned_weight_exactly_zero():
    tensors, flat, segments = flat_problem(1, pad=0)
    opt = Lamb([{"params": [flat], "names": ["a", "b", "c", "d", "e", "f"], "weight_decay": WD}], lr=LR)
    opt.segments = {id(flat): segments}
    pruned = torch.arange(flat.numel()) % 3 == 0
    with torch.no_grad():
        flat[pruned] = 0
    for _ in range(3):
        flat.grad = torch.randn(flat.numel()).masked_fill(pruned, 0)
        opt.step()
    assert torch.equal(flat.detach()[pruned], torch.zeros(int(pruned.sum())))


@pytest.mark.parametrize("path", ["multi-tensor", "flat"])
def test_a_step_has_no_host_sync_and_kernels_independent_of_the_layer_count(path):
    def costs(layers):
        if path == "flat":
            tensors, flat, segments = flat_problem(layers)
            opt = Lamb([{"params": [flat], "names": [str(i) for i in range(len(tensors))], "weight_decay": WD}],
                       lr=LR)
            opt.segments = {id(flat): segments}
            flat.grad = torch.randn(flat.numel())
        else:
            net = model(layers)
            opt = Lamb(parameter_groups(net, WD, one_per_parameter=False), lr=LR)
            for p in net.parameters():
                p.grad = torch.randn_like(p)
        opt.step()  # the first step creates the moments
        with count_costs() as c:
            opt.step()
        return c

    small, large = costs(2), costs(12)
    assert small.host_syncs == large.host_syncs == 0, large.summary()
    assert small.kernels == large.kernels, (small.summary(), large.summary())
    assert small.collectives == large.collectives == 0


def test_one_reduction_per_call_with_every_row_named():
    net = model(3)
    seen = []
    opt = Lamb(parameter_groups(net, WD, one_per_parameter=False), lr=LR,
               norm_reducer=lambda sq, names: seen.append((tuple(sq.shape), list(names))))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    names = [n for n, _ in net.named_parameters()]
    assert len(seen) == 1 and seen[0][0] == (len(names), 2) and sorted(seen[0][1]) == sorted(names)
