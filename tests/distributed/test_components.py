"""Sparsity and structured pruning as components of one Trainer, on gloo: the shrink carries the
sparse masks and the optimizer's moments (AdamW as LAMB), exactly."""

import json
import math

import pytest

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
    if stage == 2:
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
