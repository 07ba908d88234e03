"""Sparsity and structured pruning as components of one Trainer, on gloo: the shrink carries the
sparse masks and the optimizer's moments (AdamW as LAMB), exactly."""

import json
import math

import pytest
import torch

from dslaunch import run_script

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def carry_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("carry") / "carry.json"
    run_script("carry_check.py", out)
    return json.loads(out.read_text())


def cases(report, **match):
    """Every rank's report of the case matching ``match``."""
    found = [[c for c in per_rank if all(c[k] == v for k, v in match.items())] for per_rank in report["ranks"]]
    assert all(len(f) == 1 for f in found), match
    return [f[0] for f in found]


def kept(density: float, numel: int) -> int:
    """The sparsifier's count rule (masks.density.active_counts): floor(density * numel + 0.5)."""
    return math.floor(density * numel + 0.5)


@pytest.mark.parametrize("stage", [2, 3])
def test_adamw_earlybert_with_sparsity_carries_masters_moments_and_masks(carry_report, stage):
    """DP2, ZeRO-2/3, AdamW, micro 2 x accumulation 2, SET 50% with updates at steps 3 and 6 and
    the ticket forced at step 4. Across the shrink: the new engine's fp32 masters and both Adam
    moments equal the old engine's with removed units cut and coefficients folded, to the bit;
    AdamW's step count continues; every mask is the old logical mask cut to the ticket's rows and
    columns; pruned weights are zero in masters and moments before and after; outputs equal the
    masked model's; masks are equal on both ranks; after the next update every weight holds
    exactly its configured count on the smaller shape."""
    density = 1 - carry_report["sparsity"]
    ranks = cases(carry_report, stage=stage, optimizer="AdamW", after_shrink=False)
    for r in ranks:
        assert r["failures"] == [], r["failures"][:5]
        assert r["phase"] == "shrunk"
        assert r["shrink"]["step"] == 4
        assert r["relative_diff"] < 1e-5  # fp32: the shrunk model computes the masked model
        assert r["shrink"]["heads"] == [2, 2] and r["shrink"]["ffn"] == [64, 64]
        # the carried masks are the cut of the old ones (checked mask by mask in the script)
        assert r["shrink"]["counts"] == r["shrink"]["carried_counts"]
        assert [u["step"] for u in r["updates"]] == [3, 6]
        before, after = r["updates"]
        for name, numel in before["numel"].items():
            assert before["counts"][name] == kept(density, numel), name       # the full model at step 3
            assert after["numel"][name] < numel                               # the smaller shapes
            assert after["counts"][name] == kept(density, after["numel"][name]), name  # step 6
            # a carried mask keeps what survived the cut: not the target count of the new shape
        assert r["shrink"]["counts"] != {n: kept(density, c) for n, c in r["shrink"]["numel"].items()}
    assert ranks[0]["updates"] == ranks[1]["updates"]  # fingerprints and counts equal on both ranks
    # nothing keeps the old engine alive, under ZeRO-3 too (release_engine drops DeepSpeed's globals)
    assert all(r["old_engine_released"] == 1.0 for r in ranks)


def test_sparsity_after_shrink_draws_its_first_masks_on_the_shrunk_model(carry_report):
    """LAMB, ZeRO-2, ``sparsity.after_shrink``: dense through the search (no update at step 3),
    the first masks drawn on the shrunk model at the ticket step with the exact count of every
    weight, masters and moments carried where the masks keep and zero where they prune."""
    density = 1 - carry_report["sparsity"]
    ranks = cases(carry_report, stage=2, optimizer="Lamb", after_shrink=True)
    for r in ranks:
        assert r["failures"] == [], r["failures"][:5]
        assert r["shrink"]["step"] == 4 and r["shrink"]["carried_counts"] is None
        for name, numel in r["shrink"]["numel"].items():
            assert r["shrink"]["counts"][name] == kept(density, numel), name
        assert [u["step"] for u in r["updates"]] == [6]
        for name, numel in r["updates"][0]["numel"].items():
            assert r["updates"][0]["counts"][name] == kept(density, numel)
    assert ranks[0]["updates"] == ranks[1]["updates"]


def test_dp2_x_tp2_run_carries_its_masks_through_the_shrink(earlybert_tp2_run):
    """The shared DP2 x TP2 ZeRO-2 EarlyBERT run (conftest.py) is sparse too: SET 50%, updates at
    7, 14, 21; the ticket falls at 9 or 12. global_step8 holds step 7's masks, exactly 50% of
    every weight; global_step12 (after the shrink, before the next update) holds exactly those
    masks cut to the ticket's heads and neurons; global_step16 and 24 hold exactly 50% of every
    smaller weight. Both data-parallel ranks of a tensor-parallel shard hold the same masks."""
    from dist_sparse.train.checkpoint import logical_masks
    from dist_sparse.structure import Ticket, shrink_state_dict

    run = earlybert_tp2_run
    ckpt = run / "checkpoints"
    structure = json.loads((ckpt / "global_step12" / "structure.json").read_text())
    assert structure["structured"]["phase"] == "shrunk"
    ticket = Ticket.from_dict(structure["structured"]["ticket"])
    before, at12 = logical_masks(ckpt / "global_step8"), logical_masks(ckpt / "global_step12")
    assert len(before) == 4 * 6 and before.keys() == at12.keys()
    head_dim = 256 // 4  # bert-mini: hidden 256, 4 heads
    cut = shrink_state_dict(before, ticket, head_dim)
    for name, m in before.items():
        assert int(m.sum()) == kept(0.5, m.numel()), name
        assert torch.equal(at12[name], cut[name]), f"{name}: not the step-7 mask cut to the ticket"
    for tag in ("global_step16", "global_step24"):
        for name, m in logical_masks(ckpt / tag).items():
            assert m.shape == cut[name].shape
            assert int(m.sum()) == kept(0.5, m.numel()), (tag, name)
    for tag in ("global_step8", "global_step24"):
        # AutoTP's mesh: ranks 0 and 2 hold TP shard 0 at data-parallel ranks 0 and 1
        a, b = (torch.load(ckpt / tag / f"sparsity_rank{r}.pt", weights_only=False) for r in (0, 2))
        assert (a["layout"]["tp_rank"], b["layout"]["tp_rank"], a["layout"]["dp_rank"], b["layout"]["dp_rank"]) == (0, 0, 0, 1)
        assert a["masks"].keys() == b["masks"].keys()
        for name, (packed, shape) in a["masks"].items():
            assert tuple(shape) == tuple(b["masks"][name][1]) and torch.equal(packed, b["masks"][name][0]), (tag, name)
