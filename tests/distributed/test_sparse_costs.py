"""Gradient masking and mask updates under real ZeRO, with their costs (``scripts/sparse_costs.py``).

ZeRO-3 masks this rank's gradient partitions in place (bf16 and fp32, accumulation 2): the
gradient the optimizer reads is exactly zero where pruned, and so are weights, masters and
moments after every step; the masking waits for nothing and launches one fused kernel. RigL at
ZeRO-1/2 (fp32 and bf16, DP2) reads only its fragment of the reduced gradient: masks are the same
on both ranks, the counts exact, and an update sends at most one bf16 all-reduce of the sparse
weights. A fixed-mask step never reads the device.
"""

import json

import pytest

from dslaunch import run_script

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("costs") / "report.json"
    run_script("sparse_costs.py", out)
    return json.loads(out.read_text())


def cases(report):
    return list(zip(*report["ranks"]))


def test_the_cases_ran(report):
    seen = {(r[0]["stage"], r[0]["section"]["method"], r[0]["bf16"]) for r in cases(report)}
    assert seen == {(3, "static", True), (3, "set", False), (2, "rigl", False), (2, "rigl", True), (1, "rigl", True)}
    assert all(len(per_rank) == 2 and per_rank[0]["dp"] == 2 for per_rank in cases(report))


def test_pruned_gradients_weights_masters_and_moments_are_exactly_zero(report):
    for per_rank in cases(report):
        for r in per_rank:
            assert r["failures"] == [], (r["stage"], r["section"], r["bf16"], r["failures"][:5])


def test_masks_are_identical_on_both_ranks_with_exact_counts(report):
    for per_rank in cases(report):
        first = per_rank[0]
        for r in per_rank[1:]:
            assert r["fingerprints"] == first["fingerprints"], (first["stage"], first["section"])
        if first["stage"] < 3:  # replicated: every rank holds whole masks and counts them whole
            assert first["updates"], first["section"]
            for u in first["updates"]:
                assert u["counts"] == first["expected_counts"], (first["stage"], u)


def test_zero3_masking_never_waits_and_launches_one_kernel(report):
    for per_rank in cases(report):
        for r in per_rank:
            if r["stage"] != 3:
                continue
            masking = [c for c in r["costs"] if c["what"] == "mask_gradients"]
            assert masking, r["section"]
            for c in masking:  # static and SET: every step masks (no dense-gradient read)
                assert (c["host_syncs"], c["kernels"], c["collectives"]) == (0, 1, 0), c["summary"]


def test_a_fixed_mask_step_reads_nothing_from_the_device(report):
    for per_rank in cases(report):
        for r in per_rank:
            fixed = [c for c in r["costs"] if c["what"] == "step" and not c["update"]]
            assert fixed, r["section"]
            for c in fixed:
                assert (c["host_syncs"], c["collectives"]) == (0, 0), c["summary"]


def test_rigl_sends_at_most_one_bf16_all_reduce_of_the_sparse_weights(report):
    """Apply (reading what the decision needs, zeroing ZeRO's copies) and sync (agreeing on the
    decision, gathering the decided bits, verifying) bytes of every RigL update at ZeRO-1/2."""
    checked = 0
    for per_rank in cases(report):
        for r in per_rank:
            if r["section"]["method"] != "rigl":
                continue
            for u in r["updates"]:
                assert u["apply_bytes"] == 0, u  # no gradient crosses the network
                assert 0 < u["apply_bytes"] + u["sync_bytes"] <= r["budget"], (r["stage"], r["bf16"], u, r["budget"])
                checked += 1
            # RigL's gradient reads are counted in mask_gradients: no collective, no wait
            for c in r["costs"]:
                if c["what"] == "mask_gradients":
                    assert (c["host_syncs"], c["collectives"]) == (0, 0), c["summary"]
    assert checked >= 3 * 2 * 2  # three cases, two ranks, at least two updates each
