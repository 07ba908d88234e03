"""benchmarks/gpu_suite.py's bookkeeping: section guarding and budget, the report's shape, the
summary and its verdicts, the exact-zero count of the smoke check, and the sizes the GPU run is
promised to use. The suite itself runs in CI as `bash benchmarks/gpu_suite.sh --cpu-smoke`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def g(load_benchmark):
    return load_benchmark("gpu_suite")


def fake_results() -> dict:
    """What each section's function returns, with the keys the summary reads."""
    return {
        "dense_zero1": {"samples_per_s": 500.0, "tokens_per_s": 64000.0, "model_tflops": 400.0, "mfu": 0.40,
                        "step_time_s": 0.128},
        "dense_zero2": {"samples_per_s": 560.0, "tokens_per_s": 71680.0, "model_tflops": 450.0, "mfu": 0.455,
                        "step_time_s": 0.114},
        "sparse": {"ratio_fixed_dense_mean": 1.02, "ratio_fixed_dense_round_median": 1.01,
                   "ratio_fixed_dense_ci95": [1.0, 1.04], "ratio_rigl_dense_measured": 1.06, "rigl_interval": 100,
                   "rigl_timed_steps": 100, "rigl_update_steps_timed": 1, "ratio_apply_bf16_allreduce": 0.9},
        "mask_update": {"latency_s": {"n": 5, "mean": 0.04, "median": 0.03, "min": 0.02, "max": 0.07}},
        "structured": {"speedup_round_median": 1.3, "ideal_speedup": 1.5, "quotient": 1.3 / 1.5},
        "smoke": {"sparse_bf16_exact_zeros": {"passed": True}},
    }


def run_all(g, tmp_path, accelerator: str, fail: str | None = None, budget: float = 1e9) -> dict:
    results = fake_results()
    report = g.new_report("gpu" if accelerator == "cuda" else "cpu-smoke", accelerator,
                          "NVIDIA H100 80GB HBM3" if accelerator == "cuda" else "some CPU",
                          {s: 10 for s in g.SECTIONS}, budget)
    spent = 0.0
    for name in g.SECTIONS:
        def fn(name=name):
            if name == fail:
                raise RuntimeError(f"{name} broke")
            return results[name]
        g.run_section(report, name, fn, tmp_path, estimate=10, remaining=budget - spent)
        spent += 10
        # rewritten after every section: what is on disk is the report so far
        assert json.loads((tmp_path / g.REPORT).read_text())["sections"].keys() == report["sections"].keys()
    return report


def test_a_failing_section_is_recorded_and_the_others_still_run(g, tmp_path):
    report = run_all(g, tmp_path, "cuda", fail="sparse")
    st = {n: r["status"] for n, r in report["sections"].items()}
    assert st == {n: ("failed" if n == "sparse" else "ok") for n in g.SECTIONS}
    assert report["sections"]["sparse"]["error"] == "RuntimeError: sparse broke"
    assert report["sections"]["sparse"]["result"] is None
    assert report["summary"]["sections_failed"] == ["sparse"]
    assert report["summary"]["sparse_ratio_fixed_dense_mean"] is None
    assert report["summary"]["meets_target"]["fixed_mask"] is None
    assert report["summary"]["dense_zero2_mfu"] == 0.455
    assert g.check_report(report) == []
    assert g.check_report(json.loads((tmp_path / g.REPORT).read_text())) == []


def test_sections_past_the_budget_are_skipped_with_the_reason(g, tmp_path):
    report = run_all(g, tmp_path, "cuda", budget=35)  # 10 s estimates: three fit (35, 25, 15 left), then 5 s
    st = [report["sections"][n]["status"] for n in g.SECTIONS]
    assert st == ["ok", "ok", "ok", "skipped", "skipped", "skipped"]
    assert report["sections"]["mask_update"]["error"] == "skipped: estimate 10 s > 5 s left of the budget"
    assert report["summary"]["smoke_passed"] is None
    assert g.check_report(report) == []


def test_gpu_summary_verdicts_against_the_issue_targets(g, tmp_path):
    s = run_all(g, tmp_path, "cuda")["summary"]
    assert s["meets_target"] == {"dense_mfu": True,       # ZeRO-2 0.455 >= 0.45 (ZeRO-1 0.40 does not)
                                 "fixed_mask": True,      # 1.02 <= 1.03
                                 "rigl_dt100": False,     # 1.06 > 1.05, measured at dT=100
                                 "mask_update": True,     # median 30 ms <= 50 ms
                                 "structured": True}      # 0.867 >= 0.85
    assert s["smoke_passed"] is True
    assert s["sections_ok"] == sorted(g.SECTIONS)


def test_rigl_verdict_only_at_the_interval_the_target_names(g, tmp_path):
    report = run_all(g, tmp_path, "cuda")
    report["sections"]["sparse"]["result"]["rigl_interval"] = 10
    assert g.summarize(report)["meets_target"]["rigl_dt100"] is None


def test_cpu_smoke_report_judges_nothing_and_says_it_is_no_gpu_figure(g, tmp_path):
    report = run_all(g, tmp_path, "cpu")
    assert report["is_gpu_figure"] is False and report["peak_bf16_tflops"] is None
    assert "meets_target" not in report["summary"]
    assert "NOT GPU figures" in g.format_summary(report).splitlines()[0]
    assert g.check_report(report) == []


def test_check_report_names_what_is_wrong(g, tmp_path):
    report = run_all(g, tmp_path, "cuda")
    del report["sections"]["smoke"]
    report["sections"]["sparse"]["error"] = None
    report["sections"]["sparse"]["status"] = "failed"
    report["is_gpu_figure"] = False
    assert g.check_report(report) == ["is_gpu_figure disagrees with accelerator",
                                      "section 'sparse': failed without an error",
                                      "section 'smoke' missing"]
    assert g.check_report({"suite": "gpu_suite"})[0] == "missing key 'mode'"


def test_pruned_nonzeros_counts_exactly_the_pruned_entries_that_are_not_zero(g):
    mask = torch.tensor([[True, False, False], [False, True, False]])
    w = torch.tensor([[5.0, 0.0, 1e-30], [0.0, 0.0, -2.0]], dtype=torch.bfloat16)
    m = torch.tensor([[1.0, 0.0, 0.0], [0.0, 7.0, 0.0]])
    # w: pruned entries (0,1) 0, (0,2) 1e-30 (tiny but not zero: bf16 has fp32's exponent range), (1,0) 0, (1,2) -2
    assert g.pruned_nonzeros(mask, w=w, m=m) == {"w": 2, "m": 0}


def test_the_gpu_profile_measures_what_the_issue_asks(g):
    gpu, cpu = g.PROFILES["gpu"], g.PROFILES["cpu-smoke"]
    assert gpu.keys() == cpu.keys()  # the smoke run takes every code path the GPU run takes
    assert (gpu["model"], gpu["seq_len"], gpu["rigl_interval"]) == ("bert-large", 128, 100)
    assert gpu["sparse_rounds"] * gpu["sparse_steps_per_round"] >= 100  # measured, not extrapolated
    assert gpu["sparse_warmup"] + gpu["sparse_rounds"] * gpu["sparse_steps_per_round"] >= 100  # one update timed
    assert sum(g.ESTIMATES_GPU.values()) <= g.DEFAULT_GPU_BUDGET_S
    assert set(g.ESTIMATES_GPU) == set(g.ESTIMATES_CPU) == set(g.SECTIONS)


@pytest.mark.parametrize("zero", [1, 2])
def test_the_suite_configs_take_the_client_lamb_and_so_build_no_op(g, zero):
    """On CUDA, Lamb without ZeRO is DeepSpeed's FusedLamb and AdamW is FusedAdam, both JIT-built:
    every config of the suite must be bf16 Lamb under ZeRO >= 1, which build_optimizer turns into
    dist_sparse's Lamb (the branch it takes on CUDA as on CPU)."""
    from dist_sparse.config import parse_run_config
    from dist_sparse.optim import Lamb
    from dist_sparse.model.presets import build_config, build_model
    from dist_sparse.train.engine import build_optimizer

    raw = json.loads((ROOT / g.CONFIGS[zero]).read_text())
    run_cfg = parse_run_config(g.prepare_deepspeed_dict(raw, 2), source=g.CONFIGS[zero])
    assert run_cfg.zero_stage == zero and raw["bf16"]["enabled"] is True
    ds = dict(run_cfg.deepspeed)
    opt = build_optimizer(build_model(build_config("bert-tiny", vocab_size=100)), run_cfg, ds)
    assert isinstance(opt, Lamb) and "optimizer" not in ds
