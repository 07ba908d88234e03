"""Sparse pre-training runs end to end: masks survive a crash and resume exactly (ZeRO-3),
resume refuses mismatched sparsity, `dist-sparse inspect` reads the masks back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export_checks import export_and_check
from dslaunch import ROOT, launch

pytestmark = pytest.mark.distributed

PRETRAIN = ROOT / "launchers" / "pretrain.py"
SPARSITY = {"method": "set", "sparsity": 0.8, "distribution": "erk", "update_interval": 2,
            "drop_fraction": 0.3, "drop_schedule": "cosine", "end_fraction": 1.0, "seed": 1}


def config(tmp_path: Path, stage: int, sparsity: dict | None, name: str) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / f"cpu_zero{stage}.json").read_text())
    # the config's global batch as micro batch 4 x accumulation 2, as real recipes accumulate
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 4, 2
    if sparsity is not None:
        cfg["sparsity"] = sparsity
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def pretrain(cfg: Path, data: Path, run: Path, *extra, **kw):
    return launch([PRETRAIN, "--deepspeed_config", cfg, "--data", data, "--model", "bert-tiny",
                   "--output", run, "--no-progress", *extra], **kw)


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def masks_of(tag_dir: Path) -> dict:
    out = {}
    for f in sorted(tag_dir.glob("sparsity_rank*.pt")):
        st = torch.load(f, weights_only=False)
        out[f.name] = {n: bytes(p.numpy().tobytes()) for n, (p, _) in st["masks"].items()}
    return out


def inspect_counts(run: Path) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-m", "dist_sparse.cli", "inspect", str(run)],
                          capture_output=True, text=True, check=True)
    return {line.split()[0]: int(line.split()[2]) for line in proc.stdout.splitlines()
            if line.startswith("bert.encoder.layer.")}


def test_lamb_with_gradient_accumulation_keeps_exact_masks(data_dir, tmp_path):
    """The recipe that used to stop at the first mask update (`exp_avg not found in optimizer
    state fragment`): cpu_zero2_lamb.json with micro batch 4 x accumulation 2 on 2 ranks, SET 80%,
    an update every 3 steps. The masks change at steps 3 and 6 and keep exactly 20% of every weight."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_lamb.json").read_text())
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 4, 2
    cfg["sparsity"] = {"method": "set", "sparsity": 0.8, "update_interval": 3, "end_fraction": 1.0}
    path = tmp_path / "lamb_ga2.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    pretrain(path, data_dir, run, "--max-steps", 7, "--save-interval", 3)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    updates = [r for r in rows if r["split"] == "sparsity" and "churn" in r]
    assert [r["step"] for r in updates] == [3, 6] and all(r["churn"] > 0 for r in updates)
    counts = inspect_counts(run)
    assert len(counts) == 12
    for name, count in counts.items():
        numel = 128 * 512 if ("intermediate" in name or "output.dense" in name and "attention" not in name) else 128 * 128
        assert count == int(0.2 * numel + 0.5), name
    assert masks_of(run / "checkpoints" / "global_step3") != masks_of(run / "checkpoints" / "global_step7")


def test_sparse_run_survives_a_crash_and_resumes_exactly(data_dir, tmp_path, capsys):
    cfg = config(tmp_path, 3, SPARSITY, "sparse3.json")
    args = ("--max-steps", 8, "--save-interval", 4)
    whole = tmp_path / "whole"
    pretrain(cfg, data_dir, whole, *args)

    broken = tmp_path / "broken"
    os.environ["DIST_SPARSE_TEST_CRASH_IN_SAVE"] = "global_step8"
    try:
        assert pretrain(cfg, data_dir, broken, *args, check=False).returncode != 0
    finally:
        del os.environ["DIST_SPARSE_TEST_CRASH_IN_SAVE"]
    assert (broken / "checkpoints" / "latest").read_text() == "global_step4"
    pretrain(cfg, data_dir, broken, *args, "--resume")

    a, b = losses(whole), losses(broken)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-6 * abs(x), f"step {step}: {x} vs {y}"
    # the masks after three more updates (steps 4, 6 and 8 of SET) are bit for bit the same
    final_whole, final_resumed = masks_of(whole / "checkpoints" / "global_step8"), masks_of(broken / "checkpoints" / "global_step8")
    assert len(final_whole) == 2 and final_whole == final_resumed
    assert masks_of(whole / "checkpoints" / "global_step4") != final_whole  # they did change

    # inspect reads the masks back: exact ERK counts for the whole logical weights
    proc = subprocess.run([sys.executable, "-m", "dist_sparse.cli", "inspect", str(whole)],
                          capture_output=True, text=True, check=True)
    from dist_sparse.masks.density import active_counts, erk_densities
    shapes = {f"bert.encoder.layer.{i}.{m}.weight": s for i in range(2) for m, s in (
        ("attention.self.query", (128, 128)), ("attention.self.key", (128, 128)), ("attention.self.value", (128, 128)),
        ("attention.output.dense", (128, 128)), ("intermediate.dense", (512, 128)), ("output.dense", (128, 512)))}
    counts = active_counts(shapes, erk_densities(shapes, 0.2))
    for name, count in counts.items():
        line = next(x for x in proc.stdout.splitlines() if x.startswith(name))
        assert int(line.split()[2]) == count, line
    assert "method set" in proc.stdout and "ZeRO-3" in proc.stdout and "step 8 of 8" in proc.stdout

    export_and_check(whole, tmp_path / "hf", data_dir, sparse=True)

    # resuming under a different sparsity section, dense, or for a different length is refused,
    # before any process group exists: rank 0's view of the two-rank launch, in this process
    def refused(config_path, *extra) -> str:
        from dist_sparse.train.main import main
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WORLD_SIZE", "2")
            mp.setenv("RANK", "0")
            code = main(["--deepspeed_config", str(config_path), "--data", str(data_dir), "--model", "bert-tiny",
                         "--output", str(whole), "--no-progress", "--resume", *map(str, extra)])
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        return err
    other = config(tmp_path, 3, dict(SPARSITY, seed=2, method="static", sparsity=0.9), "other.json")
    assert "different \"sparsity\" section" in refused(other, "--max-steps", 8)
    dense = config(tmp_path, 3, None, "dense.json")
    assert "holds sparsity masks" in refused(dense, "--max-steps", 8)
    assert "planned for 8 steps, not 10" in (err := refused(cfg, "--max-steps", 10)) and "add --extend" in err

    # --sparsity-reset from step 4: new static masks on the resumed weights, whose Adam moments
    # must be zeroed too, or the pruned weights would move again in steps 5-8
    (whole / "checkpoints" / "latest").write_text("global_step4")
    pretrain(other, data_dir, whole, "--max-steps", 8, "--resume", "--sparsity-reset")
    tag = whole / "checkpoints" / "global_step8"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from dist_sparse.train.checkpoint import logical_masks
    weights = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    masks = logical_masks(tag)
    assert len(masks) == 12
    for name, mask in masks.items():
        assert int(mask.sum()) < 0.2 * mask.numel()  # the new 90% masks
        assert torch.all(weights[name][~mask] == 0), name
