"""Pre-training on gloo: ZeRO 1/2/3 and DP2 x TP2 through the deepspeed launcher, resume, two nodes.

Each launch is a real multi-process run of ``launchers/pretrain.py`` on a small dataset prepared
from the default corpus; the assertions read what the run wrote (metrics.jsonl, TensorBoard
events, DeepSpeed's checkpoint layout).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from export_checks import export_and_check
from dslaunch import ROOT, free_port, launch, launch_env, remove_shm_buffers

pytestmark = pytest.mark.distributed

PRETRAIN = ROOT / "launchers" / "pretrain.py"


def pretrain(config: str | Path, data: Path, run: Path, *extra, nproc: int = 2, **kw):
    """``config``: a file name in ds_configs/ or a path. A run that ends well leaves no DeepSpeed
    buffers in /dev/shm (the entry point removes them; the launch helper only reports them)."""
    proc = launch([PRETRAIN, "--deepspeed_config", ROOT / "ds_configs" / config, "--data", data,
                   "--model", "bert-tiny", "--output", run, "--no-progress", *extra], nproc=nproc, **kw)
    if proc.returncode == 0:
        assert proc.shm_left == [], f"the run left DeepSpeed's buffers in /dev/shm: {proc.shm_left}"
    return proc


def metrics(run: Path, split: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [m for m in lines if m["split"] == split]


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_loss_falls(losses: list[float]):
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall on a fixed batch: {losses}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_on_a_fixed_batch(stage, data_dir, nsp_data_dir, tmp_path):
    """Stage 1 trains on sentence pairs (MLM + NSP loss), stages 2 and 3 on packed MLM sequences."""
    run = tmp_path / "run"
    data = nsp_data_dir if stage == 1 else data_dir
    pretrain(f"cpu_zero{stage}.json", data, run, "--max-steps", 16, "--overfit-batch",
             "--eval-interval", 8, "--save-interval", 8, via="deepspeed")
    train = metrics(run)
    assert [m["step"] for m in train] == list(range(1, 17))
    assert_loss_falls([m["loss"] for m in train])
    assert all(m["grad_norm"] > 0 and m["samples_per_sec"] > 0 and m["tokens_per_sec"] > 0 for m in train)
    assert [m["step"] for m in metrics(run, "eval")] == [8, 16]
    # TensorBoard carries the same curve under train/loss, step = optimizer step.
    tb = tensorboard_scalars(run, "train/loss")
    assert [s for s, _ in tb] == list(range(1, 17))
    assert [v for _, v in tb] == pytest.approx([m["loss"] for m in train], rel=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/samples_per_sec", "train/tokens_per_sec",
                "eval/mlm_loss", "eval/mlm_accuracy"):
        assert tensorboard_scalars(run, tag), tag
    # DeepSpeed's own checkpoint layout, with `latest` naming the final checkpoint.
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "global_step16"
    for tag in ("global_step8", "global_step16"):
        files = {p.name for p in (ckpt / tag).iterdir()}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
        # ZeRO-3 partitions the module states too; stages 1 and 2 keep one copy per model-parallel rank.
        model_files = ({"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"}
                       if stage == 3 else {"mp_rank_00_model_states.pt"})
        assert model_files <= files
    run_json = json.loads((run / "run.json").read_text())
    assert (run_json["world_size"], run_json["dp_size"], run_json["global_batch"]) == (2, 2, 16)
    # the checkpoint exports to a folder that stock transformers loads, verified on export
    export_and_check(run, tmp_path / "hf", data)


def test_crash_during_save_then_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    """A run dies while writing global_step8: `latest` stays on global_step4, and resuming from
    there gives the loss curve of a run that was never interrupted (LAMB, ZeRO-2, 2 ranks,
    micro batch 4 x accumulation 2)."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_lamb.json").read_text())
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 4, 2
    (tmp_path / "lamb_ga2.json").write_text(json.dumps(cfg))
    config = tmp_path / "lamb_ga2.json"
    args = ("--max-steps", 8, "--save-interval", 4, "--eval-interval", 4)
    whole = tmp_path / "whole"
    pretrain(config, data_dir, whole, *args)

    broken = tmp_path / "broken"
    os.environ["DIST_SPARSE_TEST_CRASH_IN_SAVE"] = "global_step8"
    try:
        proc = pretrain(config, data_dir, broken, *args, check=False)
    finally:
        del os.environ["DIST_SPARSE_TEST_CRASH_IN_SAVE"]
    assert proc.returncode != 0
    assert (broken / "checkpoints" / "global_step8").is_dir()  # written, never committed
    assert (broken / "checkpoints" / "latest").read_text() == "global_step4"

    pretrain(config, data_dir, broken, *args, "--resume")
    expected = [(m["step"], m["loss"]) for m in metrics(whole)]
    got = [(m["step"], m["loss"]) for m in metrics(broken)]
    assert [s for s, _ in got] == list(range(1, 9))  # lines of the lost steps 5-8 were replaced
    assert [s for s, _ in expected] == list(range(1, 9))
    for (step, a), (_, b) in zip(expected, got):
        assert abs(a - b) <= 1e-6 * abs(a), f"step {step}: uninterrupted {a} vs resumed {b}"
    assert metrics(broken, "eval")[-1]["mlm_loss"] == pytest.approx(metrics(whole, "eval")[-1]["mlm_loss"], rel=1e-6)
    assert (broken / "checkpoints" / "latest").read_text() == "global_step8"
    tb = tensorboard_scalars(broken, "train/loss")
    assert [s for s, _ in tb] == list(range(1, 9))


def test_dp2_x_tp2_trains(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain("cpu_tp2_zero2.json", data_dir, run, "--max-steps", 12, "--overfit-batch", nproc=4, via="deepspeed")
    train = metrics(run)
    assert [m["step"] for m in train] == list(range(1, 13))
    assert_loss_falls([m["loss"] for m in train])
    run_json = json.loads((run / "run.json").read_text())
    assert (run_json["world_size"], run_json["tp_size"], run_json["dp_size"]) == (4, 2, 2)
    files = {p.name for p in (run / "checkpoints" / "global_step12").iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= files


def test_two_nodes_over_loopback(data_dir, tmp_path):
    run = tmp_path / "run"
    port = free_port()
    env = dict(launch_env(), MASTER_PORT=str(port))
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "local_two_nodes.sh"), str(ROOT / "ds_configs" / "cpu_zero1.json"),
                           str(data_dir), "bert-tiny", str(run), "--max-steps", "6", "--overfit-batch", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    remove_shm_buffers(port)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "node0 exit 0, node1 exit 0" in proc.stdout
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["world_size"] == 2
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))
    assert (run / "checkpoints" / "latest").read_text() == "global_step6"
