"""The project's config sections, batch arithmetic, LR schedule, and every shipped ds_config."""

import json
from pathlib import Path

import pytest

from dist_sparse.distributed.topology import ParallelDims
from dist_sparse.config import (TrainingConfig, load_run_config, lr_multiplier,
                                parse_run_config, resolve_batch_sizes)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))


def test_configs_exist_for_every_zero_stage_on_cpu_and_gpu():
    names = {p.name for p in CONFIGS}
    for stage in (1, 2, 3):
        assert f"cpu_zero{stage}.json" in names
        assert f"bert_large_phase1_seq128_zero{stage}.json" in names
        assert f"bert_large_phase2_seq512_zero{stage}.json" in names
    assert "bert_large_phase1_seq128_zero1_tp2.json" in names
    assert "cpu_tp2_zero2.json" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_ds_config_validates(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    run_cfg = load_run_config(path)
    assert "training" not in run_cfg.deepspeed
    # DeepSpeed's own validation (pydantic, extra keys forbidden inside its sections).
    ds = DeepSpeedConfig(json.loads(json.dumps(run_cfg.deepspeed)))
    assert ds.zero_optimization_stage == run_cfg.zero_stage
    # Batch sizes multiply out for the data-parallel sizes the file is meant for.
    sizes = (1, 2) if path.name.startswith("cpu") else (8, 16, 64)
    for dp in sizes:
        train, micro, gas = resolve_batch_sizes(run_cfg.deepspeed, dp)
        assert train == micro * gas * dp
    if path.name.startswith("bert_large"):
        assert run_cfg.deepspeed["optimizer"]["type"] == "Lamb"
        assert run_cfg.deepspeed["bf16"]["enabled"] is True
        # bf16 gradients accumulated in fp32 (ZeRO-1: DeepSpeed's BF16_Optimizer; ZeRO-2/3 their
        # fp32 accumulation buffers); DeepSpeed reads the same dtype back
        assert run_cfg.deepspeed["data_types"] == {"grad_accum_dtype": "fp32"}
        assert ds.grad_accum_dtype == "fp32"
        assert run_cfg.training.decay == "polynomial"
        assert resolve_batch_sizes(run_cfg.deepspeed, 64)[0] == (65536 if "phase1" in path.name else 32768)


def test_unknown_key_in_training_section_is_named():
    with pytest.raises(ValueError, match=r'unknown key "training.warmup_step"'):
        parse_run_config({"training": {"warmup_step": 10}}, source="x.json")


def test_bad_value_is_named():
    with pytest.raises(ValueError, match=r'"training.warmup_fraction"'):
        parse_run_config({"training": {"warmup_fraction": 1.5}})


def test_batch_sizes_that_do_not_multiply_out():
    ds = {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    with pytest.raises(ValueError, match="do not multiply out"):
        resolve_batch_sizes(ds, 2)
    with pytest.raises(ValueError, match="not divisible"):
        resolve_batch_sizes({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 2)
    assert resolve_batch_sizes({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2) == (24, 4, 3)
    assert resolve_batch_sizes({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 4) == (64, 4, 4)
    with pytest.raises(ValueError, match="does not divide"):
        ParallelDims(3, 2)
    assert ParallelDims(4, 2).dp == 2


def test_lr_schedule_shapes():
    cfg = TrainingConfig(warmup_steps=10, decay="linear")
    mult = [lr_multiplier(s, cfg, 110) for s in range(110)]
    assert mult[0] == pytest.approx(0.1) and mult[9] == pytest.approx(1.0)
    assert mult[10] == pytest.approx(1.0) and mult[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(mult[10:], mult[11:]))
    poly = TrainingConfig(warmup_steps=0, decay="polynomial", decay_power=0.5, end_lr_fraction=0.0)
    assert lr_multiplier(75, poly, 100) == pytest.approx(0.5)
    cos = TrainingConfig(warmup_steps=0, decay="cosine")
    assert lr_multiplier(50, cos, 100) == pytest.approx(0.5)
    assert lr_multiplier(5, TrainingConfig(warmup_steps=0, decay="constant"), 100) == 1.0
