"""Host syncs of mask decisions do not grow with the model: counted (``costs.count_costs``) for
the decision functions ``update.first_masks`` / ``update.updated_masks`` (scores, selection,
patterns) of every method and pattern, on the unsliced reference, on ZeRO-3 slices and on bf16
ZeRO-1 master fragments of three ranks (``sparsity.fake``), for a model of one layer of six
weights and one of four such layers: the counts are equal, and exactly one device-to-host read
per selection.

Not counted there, because the layout owns them (``sparsity.layout``, with its own tests):
reading the pieces (``Decision.pieces``) before the decision and turning decided pieces into held
masks after it (``Decision.held``); there ``held`` hands the decided pieces back as they are. The
last test counts a whole ``Sparsifier.step`` on an update step, layout, install and checks
included: also constant, the decision's reads plus one for the counts and one for the
fingerprint comparison.
"""

import pytest
import torch

from dist_sparse.config import SparsityConfig
from dist_sparse.costs import count_costs
from dist_sparse.sparsity.fake import FakeWorld
from dist_sparse.sparsity.update import Decision, first_masks, updated_masks

LAYER = {"q": (8, 8), "k": (8, 8), "v": (8, 8), "o": (8, 8), "ffn1": (16, 8), "ffn2": (8, 16)}
LAYOUTS = [(1, 2, torch.float32), (3, 3, torch.float32), (3, 1, torch.bfloat16)]
STEPS = 8
SECTIONS = {
    "static": {"method": "static", "sparsity": 0.75},
    "set": {"method": "set", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "drop_fraction": 0.5},
    "rigl": {"method": "rigl", "sparsity": 0.75, "update_interval": 2, "end_fraction": 1.0, "drop_fraction": 0.5},
    "gmp": {"method": "gmp", "sparsity": 0.5, "update_interval": 2, "end_fraction": 0.8},
}
PATTERNS = {"unstructured": {}, "block": {"pattern": "block", "block_size": 2},
            "nm": {"pattern": "nm", "n": 2, "m": 4, "sparsity": 0.5}}
# (method, pattern): host syncs of the first masks and of an update. One read per selection:
# the first masks select once (GMP starts dense: none), SET and RigL keep and regrow (two),
# GMP prunes (one); N:M's one read is its NaN check (its groups are decided without counts).
EXPECTED = {("static", "unstructured"): (1, None), ("static", "block"): (1, None), ("static", "nm"): (1, None),
            ("set", "unstructured"): (1, 2), ("set", "block"): (1, 2), ("rigl", "unstructured"): (1, 2),
            ("gmp", "unstructured"): (0, 1), ("gmp", "block"): (0, 1), ("gmp", "nm"): (0, 1)}


def model(layers: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(layers)
    return {f"l{i}.{name}": torch.randn(shape, generator=g) for i in range(layers) for name, shape in LAYER.items()}


class PiecesOnly(Decision):
    """A decision whose result stays in the pieces' form (see the module docstring)."""

    def held(self, decided):
        return decided


def decision_syncs(method: str, pattern: str, layout, layers: int) -> list[tuple[int, int | None]]:
    """Per rank: host syncs of the first masks and of the first update (None: no update)."""
    dp, stage, dtype = layout
    weights = model(layers)
    world = FakeWorld(weights, dp=dp, stage=stage, dtype=dtype)
    cfg = SparsityConfig(**{**SECTIONS[method], **PATTERNS[pattern]})
    sps = world.sparsifiers(cfg, max_steps=STEPS)
    update = next((s for s in range(1, STEPS + 1) if sps[0].is_update_step(s)), None)
    g = torch.Generator().manual_seed(99)
    for name, w in weights.items():
        world.set_gradient(name, torch.randn(w.shape, generator=g))

    def on_rank(rank):
        sp = sps[rank]
        sp.prepare()  # installs the first masks the update starts from
        first = PiecesOnly(cfg, sp.layout, sp.pattern, step=0)
        first.pieces  # noqa: B018 - read before counting (the layout's)
        with count_costs() as c:
            masks = first_masks(sp.method, first)
        assert len(masks) == len(weights)
        if update is None:
            return c.host_syncs, None
        # RigL's |dense gradient|, as ``Sparsifier.mask_gradients`` reads it (the layout's cost)
        grads = sp.layout.dense_gradients(sp.masks, sp.pattern.whole_groups) if sp.method.dense_grad else {}
        decision = PiecesOnly(cfg, sp.layout, sp.pattern, update, grads)
        decision.pieces  # noqa: B018
        with count_costs() as u:
            new = updated_masks(sp.method, decision, sp.masks)
        assert sum(int(m.sum()) for m in new.values()) > 0
        return c.host_syncs, u.host_syncs

    return world.run(on_rank)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["reference", "zero3-slices", "bf16-fragments"])
@pytest.mark.parametrize("method,pattern", list(EXPECTED))
def test_decision_host_syncs_are_one_per_selection_whatever_the_number_of_weights(method, pattern, layout):
    small, large = decision_syncs(method, pattern, layout, 1), decision_syncs(method, pattern, layout, 4)
    assert small == large == [EXPECTED[method, pattern]] * layout[0]


def whole_update_syncs(method: str, pattern: str, layout, layers: int) -> list[tuple[int, int]]:
    """Per rank: host syncs of ``Sparsifier.prepare`` (first masks, installed, counted, verified)
    and of a whole ``Sparsifier.step`` on an update step (pieces, decision, held masks, install,
    count, verify): everything the training step waits for, layout included."""
    dp, stage, dtype = layout
    weights = model(layers)
    world = FakeWorld(weights, dp=dp, stage=stage, dtype=dtype)
    cfg = SparsityConfig(**{**SECTIONS[method], **PATTERNS[pattern]})
    sps = world.sparsifiers(cfg, max_steps=STEPS)
    g = torch.Generator().manual_seed(99)
    for name, w in weights.items():
        world.set_gradient(name, torch.randn(w.shape, generator=g))

    def on_rank(rank):
        sp = sps[rank]
        with count_costs() as first:
            sp.prepare()
        sp.before_step(2)
        sp.mask_gradients()  # RigL reads its dense gradient here
        with count_costs() as update:
            assert sp.step(2) is not None
        return first.host_syncs, update.host_syncs

    return world.run(on_rank)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["reference", "zero3-slices", "bf16-fragments"])
@pytest.mark.parametrize("method,pattern", [("set", "unstructured"), ("rigl", "unstructured"), ("gmp", "unstructured"),
                                            ("set", "block"), ("gmp", "nm")])
def test_a_whole_mask_update_waits_for_the_device_a_constant_number_of_times(method, pattern, layout):
    small, large = whole_update_syncs(method, pattern, layout, 1), whole_update_syncs(method, pattern, layout, 4)
    assert small == large, (small, large)
    # the decision's reads (EXPECTED), one for the exact counts, one to compare fingerprints
    # across data-parallel ranks where they hold the same masks (bf16 fragments)
    first, update = EXPECTED[method, pattern]
    verify = 1 if layout[2] == torch.bfloat16 else 0
    assert large == [(first + 1 + verify, update + 1 + verify)] * layout[0], large
