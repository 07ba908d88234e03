"""Dynamic sparse training under ZeRO 1/2/3 and AutoTP, on gloo with real processes.

One launch runs every case of ``scripts/sparse_check.py`` (static, GMP, SET, RigL; unstructured,
block and N:M; uniform and ERK) with different data on each rank; the assertions below read
what every rank recorded.
"""

import json
import math

import pytest

from dslaunch import run_script

pytestmark = pytest.mark.distributed


def script_report(tmp_path_factory, mode: str, *args, **kw) -> dict:
    """Run ``sparse_check.py MODE`` on its ranks and read the report rank 0 wrote."""
    out = tmp_path_factory.mktemp(mode) / "report.json"
    run_script("sparse_check.py", mode, out, *args, **kw)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def train_report(tmp_path_factory):
    return script_report(tmp_path_factory, "train")


def cases(report):
    """[(case of rank 0, case of rank 1, ...)] per case."""
    return list(zip(*report["ranks"]))


def test_every_stage_and_method_ran(train_report):
    seen = {(r[0]["stage"], r[0]["section"]["method"], r[0]["section"].get("pattern", "unstructured"))
            for r in cases(train_report)}
    for stage in (1, 2, 3):
        assert {m for s, m, _ in seen if s == stage} == {"static", "gmp", "set", "rigl"}
    assert {p for _, _, p in seen} == {"unstructured", "block", "nm"}
    # every case accumulates gradients, over 2 or 3 micro batches, on every stage
    assert all(r[0]["ga"] >= 2 for r in cases(train_report))
    assert {(r[0]["stage"], r[0]["ga"]) for r in cases(train_report)} >= {(s, g) for s in (1, 2, 3) for g in (2, 3)}


@pytest.fixture(scope="module")
def bf16_report(tmp_path_factory):
    return script_report(tmp_path_factory, "train-bf16")


def test_bf16_with_fp32_accumulation_keeps_every_invariant(bf16_report):
    """bf16 weights, fp32 gradient accumulation (as the BERT-large configs), accumulation 2 and 3:
    ZeRO-1 runs on DeepSpeed's BF16_Optimizer, ZeRO-2/3 on their own paths. Exact zeros in the bf16
    module weight, fp32 master and moments after every step (RigL's masked dense gradient included:
    on BF16_Optimizer it must reach the fp32 buffer the step reads), regrown weights at zero, equal
    masks on both ranks with different data, exact counts."""
    runs = cases(bf16_report)
    paths = {(r[0]["stage"], r[0]["optimizer_path"]) for r in runs}
    assert paths == {(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer"), (3, "DeepSpeedZeroOptimizer_Stage3")}
    assert {r[0]["section"]["method"] for r in runs if r[0]["stage"] == 1} >= {"set", "rigl", "static"}
    for per_rank in runs:
        first = per_rank[0]
        assert first["bf16"] and first["ga"] >= 2
        for r in per_rank:
            assert r["failures"] == [], (r["stage"], r["section"], r["failures"][:5])
            assert r["fingerprints"] == first["fingerprints"], (first["stage"], first["section"])
        assert first["updates"][-1]["counts"] == first["expected_final_counts"], (first["stage"], first["section"])
        if first["section"]["method"] in ("set", "rigl"):
            assert len({json.dumps(fp, sort_keys=True) for fp in first["fingerprints"]}) > 1


@pytest.fixture(scope="module")
def frozen_bf16_report(tmp_path_factory):
    return script_report(tmp_path_factory, "frozen-bf16")


def test_bf16_masks_are_decided_on_the_fp32_masters_alike_on_every_zero_stage(frozen_bf16_report):
    """Planted fp32 masters that all round to +-1.0 in bf16: only the masters tell the weights
    apart. The first magnitude mask is exactly the top-k of the planted fp32 values, and every
    later mask is the same under ZeRO 1, 2 and 3 (ZeRO-3 always scored its fp32 slices; ZeRO-1/2
    scored the bf16 module weights, where all of these tie)."""
    by_section = {}
    for per_rank in cases(frozen_bf16_report):
        for r in per_rank:
            assert r["failures"] == [], r["failures"][:5]
            by_section.setdefault(json.dumps(r["section"], sort_keys=True), []).append(r)
    assert len(by_section) == 6
    checked_first = 0
    for key, runs in by_section.items():
        assert {r["stage"] for r in runs} == {1, 2, 3}, key
        reference = runs[0]["logical"]
        assert len(reference) >= 3
        # RigL regrows by bf16 gradients, which the stages reduce along different paths (not
        # bitwise equal): its first (random) masks must agree, its updates need not.
        upto = 1 if '"rigl"' in key else len(reference)
        for r in runs:
            assert r["logical"][:upto] == reference[:upto], f"{key}: ZeRO-{r['stage']} decided differently in bf16"
            if r["expected_first"] is not None:
                assert r["logical"][0] == r["expected_first"], f"{key}: ZeRO-{r['stage']} first mask"
                checked_first += 1
    assert checked_first == 6  # one magnitude-initialised section, 2 ranks x 3 stages


def test_invariants_hold_on_every_rank_after_every_step(train_report):
    """Exact zeros in module weight, fp32 master and both moments; regrown weights start at zero;
    block alignment; N:M groups — checked by every rank after every step."""
    for per_rank in cases(train_report):
        for r in per_rank:
            assert r["failures"] == [], (r["stage"], r["section"], r["failures"][:5])


def test_masks_identical_on_every_rank_with_different_data(train_report):
    for per_rank in cases(train_report):
        first = per_rank[0]
        for r in per_rank[1:]:
            assert r["fingerprints"] == first["fingerprints"], (first["stage"], first["section"])
        # the masks did change where the method changes them
        if first["section"]["method"] != "static":
            assert len({json.dumps(fp, sort_keys=True) for fp in first["fingerprints"]}) > 1


def test_exact_active_counts_per_layer(train_report):
    for per_rank in cases(train_report):
        r = per_rank[0]
        section = r["section"]
        final = r["updates"][-1]["counts"]
        assert final == r["expected_final_counts"], (r["stage"], section)
        if section["method"] in ("static", "set", "rigl"):
            # always-sparse methods hold the target count at every update, not only the last
            for u in r["updates"]:
                assert u["counts"] == r["expected_final_counts"], (r["stage"], section, u["step"])
        if section["method"] == "gmp":
            totals = [sum(u["counts"].values()) for u in r["updates"]]
            assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]


def test_sync_bytes_do_not_grow_with_the_weights(train_report):
    """Agreeing on a mask update never ships masks or weights. ZeRO-1/2 ranks decide alone and
    only compare fingerprints (two int64 all-reduces per weight), except RigL, which decides on
    gradient fragments and gathers the decided bits; ZeRO-3 ranks bisect thresholds
    over their slices: at most ~70 all-reduces of one int64 per weight and selection, whatever
    the weight's size. ZeRO-3 N:M sends one int64 (NaN agreement) and the scores at its slice
    ends that complete its neighbours' groups, or nothing on an update that prunes nothing."""
    for per_rank in cases(train_report):
        for r in per_rank:
            n_weights = len(r["expected_final_counts"])
            selections = 2 if r["section"]["method"] in ("set", "rigl") else 1
            for u in r["updates"][1:]:
                sent = u["stats"]["sync_bytes"]
                if r["stage"] < 3 and r["section"]["method"] == "rigl":
                    # RigL reads only its fragment of the reduced gradient and decides on the
                    # fragments: bisection over them as ZeRO-3, then the decided bits gathered in
                    # one all-gather (1 bit per weight, every rank's bits padded to the longest)
                    bits = len(per_rank) * -(-sum(math.prod(s) for s in r["shard_shapes"].values()) // 8)
                    assert 2 * 8 * n_weights < sent <= 2 * 8 * n_weights + selections * 70 * 8 * n_weights + bits, \
                        (r["stage"], r["section"], u)
                elif r["stage"] < 3:
                    assert sent == 2 * 8 * n_weights, (r["stage"], r["section"], u)
                elif r["section"].get("pattern") == "nm":
                    assert sent in (0, 8 + r["halo_bytes"]), (r["section"], u)
                else:
                    assert 0 < sent <= selections * 70 * 8 * n_weights, (r["section"], u)
    for per_rank in zero3_nm(cases(train_report)):
        for r in per_rank:
            # static exchanges the boundaries for its first masks, GMP at every update that prunes
            if r["section"]["method"] == "static":
                assert r["initial_sync_bytes"] == 8 + r["halo_bytes"]
            else:
                pruning = [u["stats"]["sync_bytes"] for u in r["updates"][1:] if u["stats"]["changed"]]
                assert pruning and set(pruning) == {8 + r["halo_bytes"]}, r["section"]


def zero3_nm(runs):
    """The ZeRO-3 N:M runs on the models built so that slice boundaries cut groups."""
    return [per_rank for per_rank in runs if per_rank[0]["stage"] == 3 and per_rank[0]["section"].get("pattern") == "nm"
            and per_rank[0]["model"] in ("nm3", "nm4")]


def test_zero3_nm_cases_really_cut_groups(train_report, frozen_reports):
    """The N:M sections under ZeRO-3 run on weights whose slice boundaries cut groups, so the
    boundary exchange is exercised (the invariant and equality tests cannot pass vacuously)."""
    runs = cases(train_report) + [per_rank for report in frozen_reports for per_rank in cases(report)]
    nm_runs = zero3_nm(runs)
    assert len(nm_runs) == 4  # static 2:4 and GMP 1:3 trained, GMP 2:4 and 1:3 frozen
    for per_rank in nm_runs:
        cut = set().union(*(r["straddling"] for r in per_rank))
        assert any("intermediate.dense" in name for name in cut), per_rank[0]["section"]
        if per_rank[0]["model"] == "nm3":  # every weight has an odd size there
            assert cut == set(per_rank[0]["expected_final_counts"]), per_rank[0]["section"]
        assert all(r["halo_bytes"] > 0 for r in per_rank)


@pytest.fixture(scope="module")
def frozen_reports(tmp_path_factory):
    """The same sections with frozen weights on 2 ranks (ZeRO 1/2/3) and on DP2 x TP2 (ZeRO 2/3);
    N:M sections on shapes that cut groups under ZeRO-3 (2 ranks only)."""
    d = tmp_path_factory.mktemp("frozen")
    run_script("sparse_check.py", "frozen", d / "tp1.json", 1)
    run_script("sparse_check.py", "frozen", d / "tp2.json", 2, "2,3", nproc=4)
    return [json.loads((d / f).read_text()) for f in ("tp1.json", "tp2.json")]


def test_decisions_are_the_same_at_every_layout(frozen_reports):
    """Decide globally, slice locally: the logical mask after every update is the same under
    ZeRO 1, 2 and 3 and at tensor-parallel degree 1 and 2 (N:M 2:4 too; on the models whose ZeRO-3
    slices cut groups, ZeRO 1, 2 and 3 at TP=1)."""
    by_section = {}
    for report in frozen_reports:
        for per_rank in report["ranks"]:
            for r in per_rank:
                assert r["failures"] == [], r["failures"][:5]
                key = json.dumps({"model": r["model"], **r["section"]}, sort_keys=True)
                by_section.setdefault(key, []).append((report["tp"], r["stage"], r["logical"]))
    assert len(by_section) == 8
    for key, runs in by_section.items():
        layouts = {(tp, stage) for tp, stage, _ in runs}
        # every section on the default model (N:M 2:4 included) also ran at TP=2 under ZeRO 2 and 3
        assert (1, 1) in layouts and ({(2, 2), (2, 3)} <= layouts or '"model": "nm' in key), key
        if '"rigl"' in key:
            # RigL scores are gradients, and a TP=2 backward is not bitwise the TP=1 backward
            # (other reduction order, other dropout draws on half the heads): compare the
            # ZeRO stages at TP=1, where the averaged gradient is the same to the bit.
            runs = [r for r in runs if r[0] == 1]
        assert {stage for tp, stage, _ in runs if tp == 1} == {1, 2, 3}, key
        reference = runs[0][2]
        assert len(reference) >= 3  # initial mask and at least two updates
        for tp, stage, logical in runs:
            assert logical == reference, f"{key}: tp={tp} ZeRO-{stage} decided differently"


def test_planted_divergence_is_caught_and_named(tmp_path):
    out = tmp_path / "diverge.json"
    run_script("sparse_check.py", "diverge", out)
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for r in ranks:
        assert r["clean_bytes"] == 2 * 8 * 12  # min and max of one int64 per weight (12 weights)
        assert r["outcome"].startswith(f"mask of {r['victim']} differs across data-parallel ranks"), r


@pytest.fixture(scope="module")
def balance_report(tmp_path_factory):
    """DP2 x TP2 (AutoTP on gloo), SET at 70% with different data on each DP rank: balance
    "shard" under ZeRO-2 and ZeRO-3, "global" under ZeRO-2, on weights whose TP shard 0 is
    planted 4x larger than shard 1."""
    return script_report(tmp_path_factory, "balance", 2, nproc=4)


def kept(density, numel):
    """The code's count rule (masks.density.active_counts): floor(density * numel + 0.5)."""
    return math.floor(density * numel + 0.5)


def by_balance(report, balance):
    return [per_rank for per_rank in cases(report) if per_rank[0]["section"]["balance"] == balance]


def test_balance_shard_keeps_the_same_count_in_every_tp_shard(balance_report):
    runs = by_balance(balance_report, "shard")
    assert sorted(per_rank[0]["stage"] for per_rank in runs) == [2, 3]
    for per_rank in runs:
        assert sorted((r["dp_rank"], r["tp_rank"]) for r in per_rank) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for r in per_rank:
            assert r["failures"] == [], (r["stage"], r["failures"][:5])
            density = 1 - r["section"]["sparsity"]
            want = {name: [kept(density, rows * cols)] * 2 for name, (rows, cols) in r["shard_shapes"].items()}
            assert len(r["shard_counts"]) >= 4  # the first masks and at least three updates
            for step, counts in zip((u["step"] for u in r["updates"]), r["shard_counts"]):
                assert counts == want, (r["stage"], step)
        # The same masks on both DP ranks of each TP rank, with different data on each; and
        # they did change at the updates.
        for tp_rank in (0, 1):
            first, second = [r for r in per_rank if r["tp_rank"] == tp_rank]
            assert first["fingerprints"] == second["fingerprints"], (first["stage"], tp_rank)
            assert len({json.dumps(fp, sort_keys=True) for fp in first["fingerprints"]}) > 1


def test_balance_global_counts_differ_between_shards_on_the_same_weights(balance_report):
    """The contrast that makes the test above mean something: on the same planted weights the
    global decision keeps the whole weight's count, most of it in TP shard 0."""
    [per_rank] = by_balance(balance_report, "global")
    for r in per_rank:
        assert r["failures"] == [], r["failures"][:5]
        density = 1 - r["section"]["sparsity"]
        for step, counts in zip((u["step"] for u in r["updates"]), r["shard_counts"]):
            for name, (c0, c1) in counts.items():
                rows, cols = r["shard_shapes"][name]
                assert c0 + c1 == kept(density, 2 * rows * cols), (name, step)
        for name, (c0, c1) in r["shard_counts"][0].items():  # the first (magnitude) masks
            assert c0 > c1 and c0 != kept(density, math.prod(r["shard_shapes"][name])), name
