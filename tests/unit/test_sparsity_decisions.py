"""Every mask decision in one process, through the fake layout (``dist_sparse.sparsity.fake``).

The sparsifier runs as it does in training (the same layouts, patterns, methods and selection)
on plain tensors, with threads standing in for data-parallel ranks. The unsliced run (one rank,
ZeRO-2, fp32: whole shard masks decided alone) is the reference; the same decisions on ZeRO-3
slices of three ranks (cutting N:M groups of "b"), on bf16 ZeRO-1 master fragments of three ranks
(one flat buffer cut in three: "b" spans all three, the middle rank holds nothing of "a" and "c")
and on two replicated ranks must give the same masks bit for bit. Counts are checked against the
schedule and density formulas, SET/RigL updates against a plain sort, ties (unstructured, block,
N:M) against the seeded tie order.
"""

import math

import pytest
import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.masks.density import active_counts
from dist_sparse.masks.topk import random_scores, stable_seed, tie_order, tie_order_bits
from dist_sparse.schedules import drop_fraction, gmp_sparsity
from dist_sparse.sparsifier import final_densities
from dist_sparse.sparsity.fake import FakeWorld

SHAPES = {"a": (8, 12), "b": (16, 8), "c": (12, 8)}
REFERENCE = (1, 2, torch.float32)  # (data-parallel ranks, ZeRO stage, module dtype)
LAYOUTS = [(3, 3, torch.float32), (3, 1, torch.bfloat16), (2, 2, torch.float32)]
STEPS = 8

SECTIONS = {
    "static": {"method": "static", "sparsity": 0.75},
    "gmp": {"method": "gmp", "sparsity": 0.75, "update_interval": 2, "end_fraction": 0.8},
    "set": {"method": "set", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "drop_fraction": 0.5,
            "init": "magnitude"},
    "rigl": {"method": "rigl", "sparsity": 0.8, "update_interval": 3, "end_fraction": 1.0, "drop_fraction": 0.5,
             "distribution": "erk", "drop_schedule": "linear"},
}
PATTERNS = {"unstructured": {}, "block": {"pattern": "block", "block_size": 2},
            "nm": {"pattern": "nm", "n": 2, "m": 4, "sparsity": 0.5}}
COMBOS = [(m, p) for m in SECTIONS for p in PATTERNS if not (p == "nm" and m in ("set", "rigl"))]


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def gradient(step: int, name: str) -> torch.Tensor:
    """RigL's dense gradient at ``step`` (what ZeRO's reduction would give every rank)."""
    g = torch.Generator().manual_seed(1000 * step + sorted(SHAPES).index(name))
    return torch.randn(SHAPES[name], generator=g)


def section(method: str, pattern: str, **extra) -> SparsityConfig:
    return SparsityConfig(**{**SECTIONS[method], **PATTERNS[pattern], **extra})


def trace(cfg: SparsityConfig, layout=REFERENCE, values=None, steps: int = STEPS):
    """Run the sparsifier for ``steps`` steps with frozen weights; returns the world and
    [(step, logical masks, stats of rank 0, fp32 masters before the update)] for the first
    masks and every update. Every rank must return the same logical masks."""
    dp, stage, dtype = layout
    world = FakeWorld(values if values is not None else random_weights(), dp=dp, stage=stage, dtype=dtype)
    sps = world.sparsifiers(cfg, max_steps=steps)

    def logical(rank):
        return sps[rank].logical_masks()

    def first(rank):
        sps[rank].prepare()
        return logical(rank)

    def one_step(rank, step):
        sps[rank].before_step(step)
        sps[rank].mask_gradients()
        stats = sps[rank].step(step)
        return None if stats is None else (stats, logical(rank))

    out = [(0, agreed(world.run(first)), None, None)]
    for step in range(1, steps + 1):
        for name in SHAPES:
            world.set_gradient(name, gradient(step, name))
        masters = {name: world.master(name) for name in SHAPES}
        results = world.run(lambda rank: one_step(rank, step))
        if results[0] is not None:
            out.append((step, agreed([r[1] for r in results]), results[0][0], masters))
    return world, out


def agreed(per_rank: list[dict]) -> dict:
    for other in per_rank[1:]:
        assert all(torch.equal(other[n], per_rank[0][n]) for n in SHAPES), "ranks disagree on the logical masks"
    return per_rank[0]


def expected_count(cfg: SparsityConfig, name: str, step: int) -> int:
    """Active weights of ``name`` after the update at ``step`` (0: the first masks), from the
    density allocation and the schedules alone."""
    numel = math.prod(SHAPES[name])
    if cfg.pattern == "nm":
        s_t = gmp_sparsity(step, cfg.sparsity, 0, int(cfg.end_fraction * STEPS), cfg.update_interval) \
            if cfg.method == "gmp" else cfg.sparsity
        return numel // cfg.m * max(cfg.n, round(cfg.m * (1 - s_t)))
    final = final_densities(cfg, [_Shape(n, s) for n, s in SHAPES.items()])[name]
    density = final
    if cfg.method == "gmp":
        s_t = gmp_sparsity(step, cfg.sparsity, 0, int(cfg.end_fraction * STEPS), cfg.update_interval)
        density = 1.0 - (1.0 - final) * s_t / cfg.sparsity
        if step == 0:
            return numel  # GMP starts dense
    count = active_counts({name: SHAPES[name]}, {name: density})[name]
    unit = cfg.block_size ** 2 if cfg.pattern == "block" else 1
    return count // unit * unit


class _Shape:
    """What ``final_densities`` reads of a target."""

    def __init__(self, name, shape):
        self.name, self.full_shape = name, shape


@pytest.mark.parametrize("method,pattern", COMBOS)
def test_every_layout_decides_as_the_unsliced_reference_with_exact_counts(method, pattern):
    cfg = section(method, pattern)
    _, reference = trace(cfg)
    for step, masks, _, _ in reference:
        for name, mask in masks.items():
            assert int(mask.sum()) == expected_count(cfg, name, step), (name, step)
    if method != "static":
        assert len(reference) >= 3 and any(not torch.equal(reference[0][1][n], reference[-1][1][n]) for n in SHAPES)
    for layout in LAYOUTS:
        _, got = trace(cfg, layout)
        assert [s for s, *_ in got] == [s for s, *_ in reference], layout
        for (step, masks, _, _), (_, want, _, _) in zip(got, reference):
            assert all(torch.equal(masks[n], want[n]) for n in SHAPES), (layout, step)


def top(scores: torch.Tensor, eligible: torch.Tensor, k: int, salt: int) -> torch.Tensor:
    """The k best eligible scores of a weight, equal ones by the seeded tie key: a plain sort."""
    flat, elig = (scores.flatten() + 0.0).tolist(), eligible.flatten().tolist()
    keys = tie_order(torch.arange(len(flat)), salt, tie_order_bits(len(flat))).tolist()
    order = sorted((i for i in range(len(flat)) if elig[i]), key=lambda i: (-flat[i], keys[i]))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(scores.shape)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_set_and_rigl_drop_and_regrow_exactly_the_scheduled_counts(method):
    """At every update: of the k active weights the k - int(f * k) largest |w| stay, and int(f * k)
    are regrown where the grow score (seeded noise, or |dense gradient|) is largest among the
    rest; exactly what a plain sort gives. Regrown weights start at zero, so the next update
    drops them first unless they rank otherwise."""
    cfg = section(method, "unstructured")
    world, updates = trace(cfg)
    end_step = int(cfg.end_fraction * STEPS)
    index = {name: i for i, name in enumerate(sorted(SHAPES))}
    for (_, old, _, _), (step, new, stats, masters) in zip(updates, updates[1:]):
        changed = 0
        for name in SHAPES:
            k = expected_count(cfg, name, step)
            drops = int(drop_fraction(step, cfg.drop_fraction, cfg.drop_schedule, end_step) * k)
            assert drops > 0
            salt = stable_seed(cfg.seed, step, index[name])
            kept = top(masters[name].abs(), old[name], k - drops, salt)
            grow = (random_scores(SHAPES[name], cfg.seed, step, index[name]) if method == "set"
                    else gradient(step, name).abs())
            grown = top(grow, ~kept, drops, salt)
            assert int(kept.sum()) == k - drops and int(grown.sum()) == drops
            assert torch.equal(new[name], kept | grown), (name, step)
            assert (world.master(name)[~new[name]] == 0).all()
            changed += int((new[name] != old[name]).sum())
        assert stats.changed == changed and stats.active == sum(int(m.sum()) for m in new.values())


def test_gmp_prunes_on_its_grid_and_only_active_weights():
    """Updates at the grid steps up to end_step, each mask inside the previous one, the smallest
    active |w| going first, the target reached at end_step."""
    cfg = section("gmp", "unstructured")
    _, updates = trace(cfg)
    assert [step for step, *_ in updates] == [0, 2, 4, 6]  # end_step = int(0.8 * 8) = 6
    for (_, old, _, _), (step, new, _, masters) in zip(updates, updates[1:]):
        for i, name in enumerate(sorted(SHAPES)):
            assert not (new[name] & ~old[name]).any(), (name, step)
            k = expected_count(cfg, name, step)
            assert torch.equal(new[name], top(masters[name].abs(), old[name], k, stable_seed(cfg.seed, step, i)))
    final = final_densities(cfg, [_Shape(n, s) for n, s in SHAPES.items()])
    assert {n: int(m.sum()) for n, m in updates[-1][1].items()} == \
        active_counts(SHAPES, final)


def tied_weights() -> dict[str, torch.Tensor]:
    """Every magnitude equal (signs seeded): bf16-like ties everywhere."""
    g = torch.Generator().manual_seed(5)
    return {name: torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0) for name, shape in SHAPES.items()}


def seeded_first(scores_per_unit: torch.Tensor, k: int, salt: int) -> torch.Tensor:
    return top(scores_per_unit, torch.ones_like(scores_per_unit, dtype=torch.bool), k, salt)


@pytest.mark.parametrize("layout", [REFERENCE, *LAYOUTS])
def test_planted_ties_go_by_the_seeded_tie_order_on_every_layout(layout):
    """All |w| equal: the first magnitude mask keeps the k smallest tie keys of the global index
    (salted by seed, step 0, weight), spread over the weight rather than its first rows; at the
    SET update of step 2 the kept active weights are those of the smallest keys salted by step 2."""
    cfg = section("set", "unstructured", seed=3)
    _, updates = trace(cfg, layout, values=tied_weights(), steps=3)
    (_, first, _, _), (step, new, _, _) = updates
    for i, name in enumerate(sorted(SHAPES)):
        k = expected_count(cfg, name, 0)
        want = seeded_first(torch.ones(SHAPES[name]), k, stable_seed(3, 0, i))
        assert torch.equal(first[name], want), name
        rows = SHAPES[name][0]
        assert 0 < int(first[name][: rows // 2].sum()) < k  # not all in the first rows
        drops = int(drop_fraction(step, cfg.drop_fraction, cfg.drop_schedule, STEPS) * k)
        kept = top(torch.ones(SHAPES[name]), first[name], k - drops, stable_seed(3, step, i))
        assert torch.equal(new[name] & kept, kept), name


@pytest.mark.parametrize("layout", [REFERENCE, *LAYOUTS])
def test_planted_block_ties_go_by_the_seeded_order_of_the_block_grid(layout):
    cfg = section("static", "block", init="magnitude", seed=4)
    _, [(_, first, _, _)] = trace(cfg, layout, values=tied_weights(), steps=1)
    for i, name in enumerate(sorted(SHAPES)):
        rows, cols = SHAPES[name]
        blocks = expected_count(cfg, name, 0) // 4
        grid = seeded_first(torch.ones(rows // 2, cols // 2), blocks, stable_seed(4, 0, i))
        assert torch.equal(first[name], grid.repeat_interleave(2, 0).repeat_interleave(2, 1)), name


@pytest.mark.parametrize("layout", [REFERENCE, *LAYOUTS])
def test_planted_nm_ties_go_by_the_seeded_order_within_every_group(layout):
    """Equal |w| inside the groups of m (also those a ZeRO-3 slice boundary cuts): each group
    keeps the n of smallest seeded tie keys of their global index, not its first columns."""
    cfg = section("static", "nm", seed=6)
    _, [(_, first, _, _)] = trace(cfg, layout, values=tied_weights(), steps=1)
    for i, name in enumerate(sorted(SHAPES)):
        numel = math.prod(SHAPES[name])
        keys = tie_order(torch.arange(numel), stable_seed(6, 0, i), tie_order_bits(numel)).view(-1, 4)
        want = torch.zeros(numel // 4, 4, dtype=torch.bool).scatter_(1, keys.argsort(dim=1)[:, :2], True)
        assert torch.equal(first[name], want.view(SHAPES[name])), name
        assert not first[name].view(-1, 4)[:, :2].all()  # not simply the first two columns


@pytest.mark.parametrize("layout", [REFERENCE, (3, 3, torch.float32), (3, 1, torch.bfloat16)])
@pytest.mark.parametrize("pattern", ["unstructured", "block", "nm"])
def test_nan_scores_stop_every_rank(layout, pattern):
    """A NaN weight on one rank's part: every rank raises (none is left waiting in a collective)."""
    values = random_weights()
    values["b"][9, 5] = float("nan")
    cfg = section("static", pattern, init="magnitude")
    dp, stage, dtype = layout
    world = FakeWorld(values, dp=dp, stage=stage, dtype=dtype)
    sps = world.sparsifiers(cfg, max_steps=STEPS)

    def on_rank(rank):
        try:
            sps[rank].prepare()
        except ValueError as err:
            return str(err)
        return "no error"

    assert all("NaN" in message for message in world.run(on_rank))


def test_nan_in_rigl_gradient_stops_every_rank():
    cfg = section("rigl", "unstructured")
    world = FakeWorld(random_weights(), dp=3, stage=3)
    sps = world.sparsifiers(cfg, max_steps=STEPS)
    world.run(lambda rank: sps[rank].prepare())
    for name in SHAPES:
        world.set_gradient(name, gradient(3, name))
    broken = gradient(3, "c")
    broken[0, 0] = float("nan")
    world.set_gradient("c", broken)

    def on_rank(rank):
        sps[rank].before_step(3)
        sps[rank].mask_gradients()
        try:
            sps[rank].step(3)
        except ValueError as err:
            return str(err)
        return "no error"

    assert all(message.startswith("mask scores contain NaN") for message in world.run(on_rank))


@pytest.mark.parametrize("method,pattern", [("set", "unstructured"), ("set", "block"), ("rigl", "unstructured"),
                                            ("gmp", "unstructured")])
@pytest.mark.parametrize("layout", [REFERENCE] + LAYOUTS)
def test_an_update_after_carried_masks_brings_every_weight_to_its_goal(method, pattern, layout):
    """Masks taken over from a structured shrink (``install_logical_masks``) hold what survived
    the cut, not the goal's count: here "a" lost its first two rows' active weights and "b" got
    its first two rows whole. At the next update SET and RigL keep what they can and regrow up to
    the goal, so every weight holds exactly the goal's count again; GMP, which only prunes, keeps
    all of "a" (cut below its goal: only its first two rows) and prunes "b" down to the goal."""
    cfg = section(method, pattern)
    dp, stage, dtype = layout
    world = FakeWorld(random_weights(), dp=dp, stage=stage, dtype=dtype)
    sps = world.sparsifiers(cfg, max_steps=STEPS)
    world.run(lambda rank: sps[rank].prepare())
    carried = dict(agreed(world.run(lambda rank: sps[rank].logical_masks())))
    carried["a"] = carried["a"].clone()
    carried["a"][:2] = False          # block-aligned for block_size 2
    if method == "gmp":               # GMP starts dense: below its first goal takes a deeper cut
        carried["a"][2:] = False
        carried["a"][:2] = True
    carried["b"] = carried["b"].clone()
    carried["b"][:2] = True
    world.run(lambda rank: sps[rank].install_logical_masks(carried, step=1))
    update = next(s for s in range(2, STEPS + 1) if sps[0].is_update_step(s))

    def one_step(rank, step):
        sps[rank].before_step(step)
        sps[rank].mask_gradients()
        return sps[rank].step(step)

    for step in range(2, update + 1):
        for name in SHAPES:
            world.set_gradient(name, gradient(step, name))
        world.run(lambda rank: one_step(rank, step))
    after = agreed(world.run(lambda rank: sps[rank].logical_masks()))
    for name in SHAPES:
        goal = expected_count(cfg, name, update)
        if method == "gmp" and name == "a":
            assert int(carried[name].sum()) < goal
            assert torch.equal(after[name], carried[name]), name  # nothing to prune: all kept
        else:
            assert int(after[name].sum()) == goal, (name, int(carried[name].sum()), goal)
