"""benchmarks/dynabert_grid.py, its pure parts: the grid and the sub-network selection, the
arguments, the FLOP counts, the rows built from (fake) run outputs, the tables, the RESULTS.md
block and the step-cost fit of the full-run estimate. No launch."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def g(load_benchmark):
    return load_benchmark("dynabert_grid")


def args_of(g, *argv):
    args = g.build_parser().parse_args(["--output-dir", "/tmp/x", *argv])
    g.resolve_args(args)
    return args


def test_grid_is_largest_first_like_dynabert(g):
    from dist_sparse.config import DynaBertConfig

    cells = g.grid([0.25, 0.5, 0.75, 1.0], [0.5, 0.75, 1.0])
    assert cells[0] == (1.0, 1.0) and len(cells) == 12
    assert cells == DynaBertConfig(phase=2, width_mult=[0.25, 0.5, 0.75, 1.0], depth_mult=[0.5, 0.75, 1.0]).schedule()


def test_defaults_full_and_quick(g):
    full = args_of(g)
    assert full.width_list == [1.0, 0.75, 0.5, 0.25] and full.depth_list == [1.0, 0.75, 0.5]
    assert len(full.alone_cells) == 11 and (1.0, 1.0) not in full.alone_cells
    assert sorted(full.pt_alone_cells) == [(0.25, 0.5), (0.25, 1.0), (1.0, 0.5)]
    assert (full.phase_steps, full.pt_phase_steps, full.threads) == (60, 40, 1)
    assert full.json_out.endswith("benchmarks/results/dynabert_grid.json") and full.results_md
    quick = args_of(g, "--quick")
    assert quick.cells == [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)]
    assert quick.alone_cells == [(0.5, 1.0), (1.0, 0.5), (0.5, 0.5)] and quick.pt_alone_cells == [(0.5, 0.5)]
    assert quick.results_md is None and quick.json_out == "/tmp/x/dynabert_grid.json"


def test_subnetwork_selection(g):
    cells = g.grid([0.5, 1.0], [0.5, 1.0])
    assert g.pick_subnetworks("none", cells, [], "--alone") == []
    assert g.pick_subnetworks("w0.5_d0.5, w1_d0.5", cells, [], "--alone") == [(1.0, 0.5), (0.5, 0.5)]
    assert g.pick_subnetworks(None, cells, [(0.5, 0.5)], "--alone") == [(0.5, 0.5)]
    with pytest.raises(ValueError, match=r"unknown sub-network\(s\) \['w0.25_d1'\]; the grid has w1_d1, w0.5_d1"):
        g.pick_subnetworks("w0.25_d1", cells, [], "--alone")


@pytest.mark.parametrize("argv, message", [
    (["--widths", "0.5"], "1.0 among them"),
    (["--depths", "0.5,1.5"], r"multipliers in \(0, 1\]"),
    (["--widths", "0.3,1"], "usable: 0.25, 0.5, 0.75, 1"),
    (["--depths", "0.6,1"], "does not keep a whole number of the 4 layers"),
    (["--phase-steps", "0"], "--phase-steps must be >= 1"),
])
def test_bad_arguments_are_refused(g, argv, message):
    with pytest.raises(ValueError, match=message):
        args_of(g, *argv)


def base_config(g, labels=2):
    from dist_sparse.model.presets import build_config

    return build_config("bert-mini", vocab_size=8000, num_labels=labels)


def test_subnet_config_is_the_cut_models_shape(g):
    import torch

    from dist_sparse.dynabert.subnet import subnetwork_state_dict
    from dist_sparse.model import DistSparseBertForPreTraining

    cfg = base_config(g)
    cfg.unit_order_tp = 1
    sd = DistSparseBertForPreTraining(cfg).state_dict()
    for w, d in [(0.25, 0.5), (1.0, 0.75), (0.5, 1.0), (1.0, 1.0)]:
        mine = g.subnet_config(cfg, w, d)
        _, cut = subnetwork_state_dict({k: v for k, v in sd.items() if torch.is_tensor(v)}, cfg, w, d)
        assert mine.num_hidden_layers == cut.num_hidden_layers
        assert [mine.heads_of(i) for i in range(mine.num_hidden_layers)] == \
            [cut.heads_of(i) for i in range(cut.num_hidden_layers)]
        assert [mine.intermediate_of(i) for i in range(mine.num_hidden_layers)] == \
            [cut.intermediate_of(i) for i in range(cut.num_hidden_layers)]


def test_run_flops_gated_passes_compute_full_width(g):
    from _common import classifier_forward_per_token

    cfg = base_config(g)
    shapes = [[(16, 100), (16, 80)], [(16, 128), (16, 64)]]
    cells = [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)]
    gated = g.run_flops("finetune", cells, cfg, cfg, gated=True, shapes=shapes, num_labels=2)
    full = sum(3 * b * n * classifier_forward_per_token(cfg, n, 2) for step in shapes for b, n in step)
    half_depth = sum(3 * b * n * classifier_forward_per_token(g.subnet_config(cfg, 1.0, 0.5), n, 2)
                     for step in shapes for b, n in step)
    # two full-depth passes and two half-depth passes, all at full width as computed
    assert gated["student_tflops"] == pytest.approx((2 * full + 2 * half_depth) / 1e12)
    assert gated["student_tflops_sliced"] < gated["student_tflops"]
    assert gated["teacher_forward_tflops"] == pytest.approx(full / 3 / 1e12)
    assert gated["passes_per_step"] == 4 and gated["padded_tokens"] == 16 * (100 + 80 + 128 + 64)
    alone = g.run_flops("finetune", [(0.5, 0.5)], cfg, None, gated=False, shapes=shapes, num_labels=2)
    assert alone["student_tflops"] == alone["student_tflops_sliced"] < half_depth / 1e12
    assert alone["teacher_forward_tflops"] == 0


def fake_result(g, device="cpu"):
    cells = g.grid([0.5, 1.0], [0.5, 1.0])
    m = lambda f1: {"f1": f1, "accuracy": f1 + 0.02, "loss": 1 - f1}  # noqa: E731
    phase1 = {"full": m(0.90), "subnetworks": {"w0.5_d1": m(0.85)}}
    phase2 = {"full": m(0.91), "subnetworks": {"w0.5_d1": m(0.86), "w1_d0.5": m(0.84), "w0.5_d0.5": m(0.80)}}
    alone = {"w0.5_d0.5": {"eval": m(0.82), "total_tflops": 1.5}}
    timing = {"device": device, "device_name": "cpu x", "precision": "fp32", "threads": 1, "batch": 8, "seq_len": 128,
              "rounds": 3, "steps_per_round": 2, "loadavg_1m_before_after": [2.0, 2.5], "timed_wall_s": 10.0,
              "subnetworks": {g.subnet_name(w, d): {
                  "layers": int(4 * d), "heads": int(4 * w), "ffn": int(1024 * w), "params": 3e6 * w * d,
                  "flops_per_token": 7e6 * w * d, "speedup_round_median": 1 / (w * d), "speedup_means": 1 / (w * d),
                  "speedup_means_ci95": [0.9 / (w * d), 1.1 / (w * d)], "flop_ideal_speedup": 1 / (w * d),
                  "sequences_per_s": 100 / (w * d), "max_abs_logit_diff_vs_gated": 1e-6} for w, d in cells}}
    ft_rows = g.finetune_rows(cells, phase1, phase2, alone, timing, "f1")
    pt_run = lambda full, subs: {"eval": {"mlm_loss": full}, "subnetworks": {k: {"mlm_loss": v}  # noqa: E731
                                                                             for k, v in subs.items()}}
    pt_rows = g.pretrain_rows(cells, pt_run(6.0, {"w0.5_d1": 6.5}),
                              pt_run(6.1, {"w0.5_d1": 6.4, "w1_d0.5": 6.6, "w0.5_d0.5": 6.9}),
                              {"w0.5_d0.5": {"eval": {"mlm_loss": 7.0}, "total_tflops": 0.5}},
                              {g.subnet_name(w, d): 2e7 * w * d for w, d in cells})
    runs = [{"name": n, "steps": s, "passes_per_step": p, "student_tflops": t, "student_tflops_sliced": t / 2,
             "teacher_forward_tflops": 0.1, "total_tflops": t + 0.1, "train_loop_s": 10.0, "wall_s": 30.0,
             "loadavg_1m_after": 2.0}
            for n, s, p, t in [("teacher", 10, 1, 1.0), ("ft_phase1", 4, 2, 2.0), ("ft_phase2", 4, 4, 3.0),
                               ("ft_alone_w0.5_d0.5", 8, 1, 0.4), ("pt_phase1", 3, 2, 2.0), ("pt_phase2", 3, 4, 3.0),
                               ("pt_alone_w0.5_d0.5", 6, 1, 0.4)]]
    return {"metric": "f1", "task_name": "default", "phase_steps": 4, "pt_phase_steps": 3, "infer_seq_len": 128,
            "cells": [list(c) for c in cells], "teacher": {"eval": m(0.905), "steps": 10},
            "pretrain": {"base": {"steps": 10, "eval": {"mlm_loss": 7.5}}}, "finetune_rows": ft_rows,
            "pretrain_rows": pt_rows, "timing": timing, "runs": runs, "base_model": "bert-mini"}


def test_rows_from_run_outputs(g):
    r = fake_result(g)
    ft = {row["name"]: row for row in r["finetune_rows"]}
    assert list(ft) == ["w1_d1", "w0.5_d1", "w1_d0.5", "w0.5_d0.5"]
    assert (ft["w1_d1"]["primary_phase1"], ft["w1_d1"]["primary_phase2"], ft["w1_d1"]["primary_alone"]) == \
        (0.90, 0.91, None)
    assert ft["w1_d0.5"]["primary_phase1"] is None          # phase 1 has no depth sub-networks
    assert ft["w0.5_d0.5"]["dynabert_minus_alone"] == pytest.approx(0.80 - 0.82)
    assert ft["w0.5_d0.5"]["alone_total_tflops"] == 1.5
    pt = {row["name"]: row for row in r["pretrain_rows"]}
    assert (pt["w1_d1"]["mlm_loss_phase1"], pt["w1_d1"]["mlm_loss_phase2"]) == (6.0, 6.1)
    assert pt["w0.5_d0.5"]["dynabert_minus_alone"] == pytest.approx(6.9 - 7.0)
    assert pt["w1_d0.5"]["mlm_loss_alone"] is None


def test_tables_cpu_ratios_only_gpu_sequences_per_second(g):
    text = g.format_tables(fake_result(g))
    assert ("| w0.5_d0.5 | 2 | 2 / 512 | 0.75M | 1.75 | - | **0.8000** | 0.8200 | -0.0200 | 4.00 | "
            "4.00 [3.60-4.40] | 4.00 |") in text
    assert "| w1_d1 | 4 | 4 / 1024 | 3.00M | 7.00 | 0.9000 | **0.9100** | - | - | 1.00 |" in text
    assert "CPU: ratios only" in text and "sequences/s" not in text
    assert "| w0.5_d0.5 | 5.00 | - | **6.9000** | 7.0000 | -0.1000 |" in text
    assert "Fine-tuning: DynaBERT's two phases 5.20 TFLOPs as computed (2.70 sliced) for all 4 sub-networks; the 1 " \
           "alone run 0.50 TFLOPs." in text
    gpu = g.format_tables(fake_result(g, device="cuda"))
    assert "sequences/s" in gpu and "| 400 |" in gpu and "CPU: ratios only" not in gpu


def test_results_md_block_replaced_or_appended(g, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Other\n\ntext\n")
    g.update_results_md(md, f"{g.BLOCK_START}\none\n{g.BLOCK_END}")
    text = md.read_text()
    assert text.startswith("# Benchmark results\n\n## Other\n\ntext\n\n" + g.SECTION_TITLE)
    assert text.endswith(f"{g.BLOCK_START}\none\n{g.BLOCK_END}\n\n### Reading\n\n(to be written)\n")
    md.write_text(text.replace("(to be written)", "kept"))
    g.update_results_md(md, f"{g.BLOCK_START}\ntwo\n{g.BLOCK_END}")
    text = md.read_text()
    assert "one" not in text and f"{g.BLOCK_START}\ntwo\n{g.BLOCK_END}" in text and text.endswith("kept\n")
    assert text.count(g.SECTION_TITLE) == 1


def test_repository_results_md_has_the_section_and_markers(g):
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert text.count(g.SECTION_TITLE) == 1 and text.count(g.BLOCK_START) == 1 and text.count(g.BLOCK_END) == 1


def test_section_config_replaces_sections(g):
    base = {"optimizer": {"params": {"lr": 1e-3}}, "sparsity": {"method": "gmp"}, "dynabert": {"phase": 1},
            "training": {"seed": 1}}
    cfg = g.section_config(base, lr=3e-4, distillation={"teacher": "T"}, eval_batches=7)
    assert cfg == {"optimizer": {"params": {"lr": 3e-4}}, "training": {"seed": 1, "eval_batches": 7},
                   "distillation": {"teacher": "T"}}
    assert base["optimizer"]["params"]["lr"] == 1e-3 and "sparsity" in base
    assert g.section_config(base, lr=0)["optimizer"]["params"]["lr"] == 1e-3


def test_step_cost_fit(g):
    assert g.fit_step_cost([(1.0, 0.5), (2.0, 0.9), (4.0, 1.7)]) == pytest.approx((0.1, 0.4))
    assert g.fit_step_cost([(2.0, 1.0), (2.0, 1.2)]) == pytest.approx((0.0, 0.55))
    a, b = g.fit_step_cost([(1.0, 1.0), (2.0, 0.5)])    # noise: a negative slope falls back to proportional
    assert a == 0.0 and b == pytest.approx(0.5)


def test_pass_equivalents(g):
    cfg = base_config(g)
    assert g.pass_equivalents("finetune", cfg, [(1.0, 1.0)], gated=False, teacher=False) == pytest.approx(1.0)
    # width 0.5 as computed by a gated pass is the full model; sliced it is about half
    assert g.pass_equivalents("finetune", cfg, [(0.5, 1.0)], gated=True, teacher=True) == pytest.approx(4 / 3)
    sliced = g.pass_equivalents("finetune", cfg, [(0.5, 1.0)], gated=False, teacher=False)
    assert 0.45 < sliced < 0.55
    pre = g.pass_equivalents("pretrain", cfg, [(0.5, 0.5)], gated=False, teacher=False)
    assert sliced / 2 < pre < 1   # the MLM head does not shrink


def test_full_run_estimate_recovers_the_measured_costs(g):
    """Fake launches whose step time is exactly 0.1 s + 0.5 s per pass-equivalent, whose start-up
    is 20 s and whose phases spend 5 s per sub-network evaluated: the estimate finds those."""
    def run(name, steps, pe, passes=1, evaluated=0):
        loop = steps * (0.1 + 0.5 * pe)
        return {"name": name, "steps": steps, "total_tflops": 2.0 * steps * pe, "train_loop_s": loop,
                "wall_s": loop + 20 + 5 * evaluated, "passes_per_step": passes}

    runs = [run("teacher", 10, 1.0), run("ft_phase1", 4, 2.33, 2, 2), run("ft_phase2", 4, 3.33, 4, 4),
            run("ft_alone_w0.5_d0.5", 8, 0.6), run("pt_base", 10, 1.0), run("pt_phase1", 3, 2.33, 2, 2),
            run("pt_phase2", 3, 3.33, 4, 4), run("pt_alone_w0.5_d0.5", 6, 0.7)]
    result = {"runs": runs, "cells": [[1.0, 1.0], [0.5, 1.0], [1.0, 0.5], [0.5, 0.5]], "prepare_s": 30.0,
              "timing": {"timed_wall_s": 6.0, "rounds": 3, "batch": 8}}
    full = args_of(g)
    cfg = base_config(g)
    est = g.estimate_seconds(result, full, {"ft": cfg, "pt": cfg, "num_labels": 2})
    for kind in ("ft", "pt"):
        k = est["per_kind"][kind]
        assert k["step_s_fixed"] == pytest.approx(0.1) and k["step_s_per_pass"] == pytest.approx(0.5)
        assert k["startup_s"] == pytest.approx(20.0) and k["eval_s_per_subnetwork"] == pytest.approx(5.0)
    # teacher + 2 phases + 11 alone; base + 2 phases + 3 alone
    assert est["per_kind"]["ft"]["launches"] == 14 and est["per_kind"]["pt"]["launches"] == 6
    # 12 timed variants instead of 4, 10 rounds instead of 3, batch 32 instead of 8
    assert est["timing_s"] == pytest.approx(6.0 * 3 * 10 / 3 * 4)
    assert est["seconds"] == pytest.approx(est["per_kind"]["ft"]["seconds"] + est["per_kind"]["pt"]["seconds"]
                                           + est["timing_s"] + 30.0)
    no_pt = args_of(g, "--no-pretraining")
    assert "pt" not in g.estimate_seconds(result, no_pt, {"ft": cfg, "num_labels": 2})["per_kind"]


def test_generated_block(g):
    r = fake_result(g)
    r.update(machine={"cpu": "cpu x", "cpu_count": 2, "python": "3.11", "torch": "2.13", "deepspeed": "0.19.8",
                      "transformers": "5", "gpu": None},
             num_ranks=2, git={"commit": "abcdef123", "dist_sparse_modified": False}, started_utc="s",
             finished_utc="f", wall_s=600.0, command="python benchmarks/dynabert_grid.py --output-dir /tmp/d",
             pretrain_config="ds_configs/cpu_zero2.json", finetune_config="ds_configs/cpu_zero2_finetune.json",
             lr=3e-4, seed=1234, widths=[1.0, 0.5], depths=[1.0, 0.5], pretrain_seed=1234)
    r["pretrain"]["eval_batches"] = 7
    block = g.generated_block(r)
    assert block.startswith(g.BLOCK_START + "\n- Machine: cpu x, 2 cores, no GPU;") and block.endswith(g.BLOCK_END)
    assert "gloo, fp32, 2 ranks" in block and "commit `abcdef1`" in block and "10.0 min in all" in block
    assert "widths 0.5, 1, depths 0.5, 1;" in block and "(7 micro batches per rank)" in block
    assert g.format_tables(r) in block
