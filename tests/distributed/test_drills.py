"""Failure drills, the cheap cases (issue 15, point 4): one rank SIGKILLed in the middle of a save,
a full disk during a save, a NaN loss that stops the run and one that is skipped. Each is a real
2-rank run of launchers/pretrain.py (bert-tiny, ZeRO-2, 6 steps, a checkpoint every 2); the
recoveries are compared with one uninterrupted run of the same length. Many trials at random
moments: benchmarks/drills.py.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from dslaunch import ROOT, launch

pytestmark = pytest.mark.distributed

PRETRAIN = ROOT / "launchers" / "pretrain.py"
ARGS = ("--max-steps", 6, "--save-interval", 2, "--eval-interval", 6)


def config(tmp: Path, name: str, **training) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    cfg["training"].update(training)
    path = tmp / name
    path.write_text(json.dumps(cfg))
    return path


def pretrain(cfg: Path, data: Path, run: Path, *extra, env=None, **kw):
    return launch([PRETRAIN, "--deepspeed_config", cfg, "--data", data, "--model", "bert-tiny", "--output", run,
                   "--no-progress", *ARGS, *extra], env=env, **kw)


def rows(run: Path, split: str = "train") -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [m for m in lines if m["split"] == split]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in rows(run)]


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text()


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run every recovery is compared with."""
    tmp = tmp_path_factory.mktemp("drills")
    cfg = config(tmp, "zero2.json")
    run = tmp / "whole"
    pretrain(cfg, data_dir, run)
    assert [s for s, _ in losses(run)] == list(range(1, 7)) and latest(run) == "global_step6"
    return cfg, run


def assert_resumed_exactly(run: Path, whole: Path) -> None:
    """The resumed run's curve is the uninterrupted one, bit for bit (JSON keeps a float exactly)."""
    assert losses(run) == losses(whole)
    assert [m["mlm_loss"] for m in rows(run, "eval")] == [m["mlm_loss"] for m in rows(whole, "eval")]
    assert latest(run) == "global_step6"


def test_sigkill_of_one_rank_mid_save_under_the_deepspeed_launcher(reference, data_dir, tmp_path):
    """Rank 1 SIGKILLs itself after DeepSpeed's files of global_step4 and before ours, while rank
    0 waits for it: the launcher ends the job (the launch would time out on a hang), `latest`
    stays on global_step2, and --resume continues it into the uninterrupted run's curve."""
    from dist_sparse.train.run_dir import whole_checkpoint

    cfg, whole = reference
    run = tmp_path / "killed"
    proc = pretrain(cfg, data_dir, run, env={"DIST_SPARSE_TEST_CRASH_IN_SAVE": "global_step4:1"}, check=False,
                    via="deepspeed", timeout=240)
    assert proc.returncode != 0
    assert "exits with return code = -9" in proc.stdout + proc.stderr  # the launcher saw the SIGKILL
    ckpt = run / "checkpoints"
    assert latest(run) == "global_step2" and whole_checkpoint(ckpt / "global_step2")
    partial = {p.name for p in (ckpt / "global_step4").iterdir()}  # written in part, never committed
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in partial and "rng_state_rank1.pt" not in partial
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]

    pretrain(cfg, data_dir, run, "--resume")
    assert_resumed_exactly(run, whole)


def test_full_disk_during_a_save(reference, data_dir, tmp_path):
    """Rank 1's first write of global_step4 fails with ENOSPC: both ranks stop with the error
    (no rank left in a barrier), the partial tag is removed, and `latest` still names global_step2,
    whose files are all whole (a resume from such a `latest` is the SIGKILL test's)."""
    from dist_sparse.train.run_dir import whole_checkpoint

    cfg, whole = reference
    run = tmp_path / "full"
    proc = pretrain(cfg, data_dir, run, env={"DIST_SPARSE_TEST_ENOSPC_IN_SAVE": "global_step4:1"}, check=False,
                    timeout=240)
    assert proc.returncode == 2
    ckpt = run / "checkpoints"
    victim = ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert (f"checkpoint {ckpt / 'global_step4'} was not saved: rank 1 could not write {victim} ([Errno 28] No space "
            "left on device; the file system mounted at ") in proc.stderr
    assert ("The partial global_step4 was removed; `latest` still names global_step2, which is complete: free space "
            "and continue with --resume") in proc.stderr
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["global_step2"] and latest(run) == "global_step2"
    assert whole_checkpoint(ckpt / "global_step2")
    assert losses(run) == losses(whole)[:4]


def test_nan_loss_stops_the_run_naming_the_step_and_the_last_checkpoint(reference, data_dir, tmp_path):
    """A NaN on rank 1 only, in step 5: both ranks stop before anything of step 5 is applied, with
    the same message; the run up to there is the uninterrupted one."""
    cfg, whole = reference
    run = tmp_path / "stopped"
    proc = pretrain(cfg, data_dir, run, env={"DIST_SPARSE_TEST_NONFINITE_LOSS": "5:1"}, check=False, timeout=240)
    assert proc.returncode == 2
    message = (f'step 5: the loss is not finite (on rank 1); training.nonfinite_loss is "stop": nothing of step 5 '
               f"was applied or saved. The last complete checkpoint is global_step4 "
               f"({run / 'checkpoints' / 'global_step4'}): continue from it with --resume")
    # the rank that exited first is last in the output; its peer may be stopped before it prints
    assert f"error (rank 1): {message}" in proc.stderr or f"error (rank 0): {message}" in proc.stderr
    assert losses(run) == losses(whole)[:4]
    assert latest(run) == "global_step4" and not (run / "checkpoints" / "global_step6").exists()


def _equal(a, b, where="") -> list[str]:
    """Where two loaded checkpoint objects differ (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in _equal(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _equal(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def test_nan_loss_skipped_changes_nothing_but_the_data_position(data_dir, tmp_path):
    """skip, with SET masks updated every 2 steps and a NaN on rank 1 in step 4, an update step:
    the checkpoint after step 4 holds exactly the weights, fp32 masters, Adam moments and step
    counts, masks and learning-rate schedule of the one after step 3; only the data position and
    DeepSpeed's step and skipped-step counters moved. train/skipped_steps counts it; step 5 trains."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    cfg["training"]["nonfinite_loss"] = "skip"
    cfg["sparsity"] = {"method": "set", "sparsity": 0.5, "update_interval": 2, "end_fraction": 1.0}
    path = tmp_path / "skip.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "skipped"
    pretrain(path, data_dir, run, "--save-interval", 1, env={"DIST_SPARSE_TEST_NONFINITE_LOSS": "4:1"}, timeout=240)

    train = rows(run)
    assert [m["step"] for m in train] == list(range(1, 7))
    assert [math.isnan(m["loss"]) for m in train] == [False, False, False, True, False, False]
    assert [m["skipped_steps"] for m in train] == [0, 0, 0, 1, 1, 1]
    assert train[3]["lr"] == train[2]["lr"] and train[2]["lr"] != train[1]["lr"]  # the schedule stood still in step 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1),
                                                                               (6, 1)]
    assert [m["step"] for m in rows(run, "sparsity") if "churn" in m] == [2]  # not 4: the skipped step

    ckpt = run / "checkpoints"

    def load(tag, name):
        return torch.load(ckpt / tag / name, map_location="cpu", weights_only=False)

    model3, model4 = (load(f"global_step{s}", "mp_rank_00_model_states.pt") for s in (3, 4))
    assert (model3["global_steps"], model3["skipped_steps"]) == (3, 0)
    assert (model4["global_steps"], model4["skipped_steps"]) == (4, 1)
    assert model4["progress"]["step"] == 4 and model4["loader"] != model3["loader"]  # the data moved on
    assert _equal(model3["module"], model4["module"]) == []
    assert _equal(model3["lr_scheduler"], model4["lr_scheduler"]) == []
    for rank in (0, 1):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        a, b = load("global_step3", name)["optimizer_state_dict"], load("global_step4", name)["optimizer_state_dict"]
        # the fp32 master partitions; Adam's moments and step count
        assert _equal(a["single_partition_of_fp32_groups"], b["single_partition_of_fp32_groups"]) == [], rank
        assert _equal(a["base_optimizer_state"], b["base_optimizer_state"]) == [], rank
        assert (a["overflow"], b["overflow"]) == (False, True)  # DeepSpeed's record of the skip
        masks = [load(f"global_step{s}", f"sparsity_rank{rank}.pt")["masks"] for s in (1, 2, 3, 4)]
        assert _equal(masks[0], masks[1]) != []  # the update at step 2 moved masks ...
        assert _equal(masks[2], masks[3]) == []  # ... the one due at step 4 did not run
    # and step 5 did train
    assert _equal(model4["module"], load("global_step5", "mp_rank_00_model_states.pt")["module"]) != []
