"""Failure handling (issue 15, point 4) in one process: the non-finite-loss decision in the
Trainer's step sequence on a fake engine, the configs that cannot skip a step, the checkpoint
writes that fail (a full disk) and the checks of a damaged checkpoint before a resume. The
multi-process drills are tests/distributed/test_drills.py and benchmarks/drills.py."""

import errno
import json
import math
import re
from pathlib import Path

import pytest
import torch

from dist_sparse.config import TrainingConfig, load_run_config
from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.folders import write_atomic
from dist_sparse.train import checkpoint as ck
from dist_sparse.train import run_dir as rd
from dist_sparse.train import trainer as tr
from dist_sparse.train.trainer import NonFiniteLoss, Trainer

ROOT = Path(__file__).resolve().parents[2]


# -- the config --------------------------------------------------------------------------------

def test_nonfinite_loss_field_defaults_to_stop_and_refuses_other_values():
    assert TrainingConfig().nonfinite_loss == "stop"
    assert TrainingConfig(nonfinite_loss="skip").nonfinite_loss == "skip"
    with pytest.raises(ValueError, match="nonfinite_loss"):
        TrainingConfig(nonfinite_loss="ignore")


@pytest.mark.parametrize("ds, problem", [
    ({"zero_optimization": {"stage": 2}}, None),
    ({"zero_optimization": {"stage": 1}}, None),
    ({"zero_optimization": {"stage": 3}}, None),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True, "check_grad_overflow": False}}, None),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, None),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, None),
    ({"fp16": {"enabled": True}}, None),
    ({}, "without ZeRO (zero_optimization.stage 0)"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": False}},
     "bf16.check_grad_overflow false"),
    ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}}, "compute_grad_norm false"),
])
def test_skip_needs_a_deepspeed_config_that_skips_non_finite_gradients(ds, problem):
    got = tr.nonfinite_skip_problem(ds)
    assert (got is None) if problem is None else (problem in got), got
    tr.check_nonfinite_policy("stop", ds)  # stopping works with any config
    if problem is None:
        tr.check_nonfinite_policy("skip", ds)
    else:
        with pytest.raises(ValueError, match=re.escape('training.nonfinite_loss "skip": ') + ".*" + re.escape(problem)):
            tr.check_nonfinite_policy("skip", ds)


def test_every_shipped_config_can_skip():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = load_run_config(path)
        assert tr.nonfinite_skip_problem(cfg.deepspeed) is None, path.name


def test_injection_variable():
    assert tr.parse_nonfinite_injection(None) is None and tr.parse_nonfinite_injection("") is None
    assert tr.parse_nonfinite_injection("5:1") == (frozenset({5}), 1)
    assert tr.parse_nonfinite_injection("3,7:0") == (frozenset({3, 7}), 0)
    for bad in ("5", "x:1", "0:1", "5:-1"):
        with pytest.raises(ValueError, match=tr.NONFINITE_LOSS_ENV):
            tr.parse_nonfinite_injection(bad)


def test_stop_message_names_the_step_the_ranks_and_the_last_checkpoint(tmp_path):
    msg = tr.nonfinite_stop_message(6, [1], tmp_path, "global_step4")
    assert msg.startswith('step 6: the loss is not finite (on rank 1); training.nonfinite_loss is "stop": nothing of '
                          f"step 6 was applied or saved. The last complete checkpoint is global_step4 "
                          f"({tmp_path / 'global_step4'}): continue from it with --resume ")
    msg = tr.nonfinite_stop_message(2, [0, 3], tmp_path, None)
    assert "(on ranks 0, 3)" in msg and "No checkpoint has been saved yet: start the run again" in msg


# -- the decision in the step sequence, on a fake engine -----------------------------------------

class FakeEngine:
    """What the Trainer's step sequence calls, recording the losses handed to backward; applies a
    step at the boundary unless the last backward's loss was not finite (DeepSpeed's overflow skip)."""

    def __init__(self, accumulation=2, skips_nonfinite=True):
        self.accumulation, self.skips_nonfinite = accumulation, skips_nonfinite
        self.device, self.optimizer = torch.device("cpu"), None
        self.micro_steps = self.global_steps = self.skipped_steps = 0
        self.backward_losses, self.applied = [], []
        self._applied = False

    def train(self):
        pass

    def gradient_accumulation_steps(self):
        return self.accumulation

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.accumulation == 0

    def backward(self, loss):
        self.backward_losses.append(float(loss))

    def step(self):
        if self.is_gradient_accumulation_boundary():
            bad = not math.isfinite(self.backward_losses[-1]) and self.skips_nonfinite
            self._applied = not bad
            self.skipped_steps += bad
            self.global_steps += 1
            self.applied.append(self._applied)
        self.micro_steps += 1

    def was_step_applied(self):
        return self._applied


class Recorder:
    name = "recorder"

    def __init__(self):
        self.after = []

    def on_step_begin(self, trainer, step):
        pass

    def passes(self, trainer, step, micro):
        return None

    def on_after_backward(self, trainer, step, micro):
        pass

    def on_before_optimizer_step(self, trainer, step):
        pass

    def on_after_optimizer_step(self, trainer, step):
        self.after.append(step)


GROUPS = ParallelGroups(dp_group=None, tp_group=None, dp_rank=0, dp_size=1, tp_rank=0, tp_size=1, global_rank=0,
                        world_size=1)


def make_trainer(engine, policy, monkeypatch, inject=None, checkpoints=None):
    if inject is None:
        monkeypatch.delenv(tr.NONFINITE_LOSS_ENV, raising=False)
    else:
        monkeypatch.setenv(tr.NONFINITE_LOSS_ENV, inject)
    monkeypatch.setattr(tr, "link_optimizer_state", lambda *a: None)
    recorder = Recorder()
    losses = iter(float(x) for x in range(1, 100))
    trainer = Trainer(engine, None, GROUPS, zero_stage=2, components=[recorder],
                      loss=lambda engine, batch: torch.tensor(next(losses)), nonfinite_loss=policy,
                      checkpoints=checkpoints)
    return trainer, recorder


def batches(n=2):
    return [{} for _ in range(n)]


def test_a_finite_step_is_untouched(monkeypatch):
    engine = FakeEngine()
    trainer, recorder = make_trainer(engine, "skip", monkeypatch)
    result = trainer.train_step(batches(), step=1)
    assert engine.backward_losses == [1.0, 2.0] and engine.applied == [True]
    assert not result.skipped and float(result.loss_sum) == 3.0 and recorder.after == [1]
    assert trainer.skipped_steps == 0


def test_skip_makes_the_last_backward_nan_and_skips_the_after_step_hooks(monkeypatch):
    """A NaN injected in the first micro batch of step 2 (added: its gradient would stay finite) is
    seen before the last backward, whose loss is then NaN, so DeepSpeed skips the step."""
    engine = FakeEngine()
    trainer, recorder = make_trainer(engine, "skip", monkeypatch, inject="2:0")
    trainer.train_step(batches(), step=1)
    result = trainer.train_step(batches(), step=2)
    assert result.skipped and math.isnan(float(result.loss_sum))
    assert engine.backward_losses[:2] == [1.0, 2.0] and math.isnan(engine.backward_losses[2])
    assert math.isnan(engine.backward_losses[3])  # the boundary's backward: made NaN on purpose
    assert engine.applied == [True, False] and trainer.skipped_steps == 1
    assert recorder.after == [1]  # no after-step hooks (mask updates, checks) for the skipped step
    trainer.train_step(batches(), step=3)
    assert engine.backward_losses[4:] == [5.0, 6.0] and engine.applied == [True, False, True]
    assert recorder.after == [1, 3]


def test_skip_refuses_a_step_deepspeed_applied_anyway(monkeypatch):
    engine = FakeEngine(skips_nonfinite=False)
    trainer, _ = make_trainer(engine, "skip", monkeypatch, inject="1:0")
    with pytest.raises(RuntimeError, match="DeepSpeed applied an optimizer step whose gradients were made non-finite"):
        trainer.train_step(batches(), step=1)


def test_stop_raises_before_the_last_backward_naming_the_checkpoint(monkeypatch, tmp_path):
    (tmp_path / "global_step4").mkdir()
    ck.commit_latest(tmp_path, "global_step4")
    engine = FakeEngine(accumulation=3)
    trainer, recorder = make_trainer(engine, "stop", monkeypatch, inject="1:0", checkpoints=tmp_path)
    with pytest.raises(NonFiniteLoss) as err:
        trainer.train_step(batches(3), step=1)
    assert (err.value.step, err.value.ranks) == (1, [0])
    assert "The last complete checkpoint is global_step4" in str(err.value)
    assert len(engine.backward_losses) == 2 and engine.applied == [] and recorder.after == []
    assert isinstance(err.value, ValueError)  # the entry point reports it as one line, exit 2


def test_injection_hits_only_its_rank(monkeypatch):
    engine = FakeEngine()
    trainer, _ = make_trainer(engine, "stop", monkeypatch, inject="1:1")  # rank 1; this process is rank 0
    assert not trainer.train_step(batches(), step=1).skipped
    assert engine.backward_losses == [1.0, 2.0]


# -- checkpoint writes that fail ------------------------------------------------------------------

class TorchCheckpointEngine:
    def save(self, state_dict, path):
        torch.save(state_dict, path)


class SavingEngine:
    """save_checkpoint as DeepSpeed's: the tag directory, then its files through the checkpoint engine."""

    def __init__(self):
        self.checkpoint_engine = TorchCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": {}, **client_state}, str(Path(save_dir) / tag / ck.model_states_file(0)))
        self.checkpoint_engine.save({"optimizer": {}}, str(Path(save_dir) / tag / ck.optim_states_file(0, 0)))


def client_state() -> ck.ClientState:
    return ck.ClientState(progress=ck.Progress(4, 32, 1000), loader={"epoch": 0, "offset": 32}, seed=1, max_steps=8,
                          model="bert-tiny", model_config={}, data_meta={}, dp_size=1, tp_size=1)


def save(engine, ckpt, step):
    ck.save(engine, ckpt, ck.tag_of(step), client_state(), ck.StructureRecord({}), {ck.rng_file(0): {"x": 1}},
            is_rank0=True, keep=0)


def test_a_full_disk_in_deepspeed_s_files_keeps_latest_and_removes_the_partial_tag(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    engine = SavingEngine()
    save(engine, ckpt, 4)
    assert ck.latest_tag(ckpt) == "global_step4"
    monkeypatch.setenv(ck.ENOSPC_IN_SAVE_ENV, "global_step8:0")
    with pytest.raises(ck.CheckpointNotSaved) as err:
        save(engine, ckpt, 8)
    msg = str(err.value)
    victim = ckpt / "global_step8" / ck.model_states_file(0)
    assert msg.startswith(f"checkpoint {ckpt / 'global_step8'} was not saved: rank 0 could not write {victim} "
                          "([Errno 28] No space left on device; the file system mounted at ")
    assert msg.endswith("The partial global_step8 was removed; `latest` still names global_step4, which is complete: "
                        "free space and continue with --resume")
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step4", "latest"]
    assert rd.whole_checkpoint(ckpt / "global_step4")
    assert "save" not in vars(engine.checkpoint_engine)  # DeepSpeed's writer is its own again
    monkeypatch.delenv(ck.ENOSPC_IN_SAVE_ENV)
    save(engine, ckpt, 8)  # space again: the same tag saves
    assert ck.latest_tag(ckpt) == "global_step8"


def test_a_failing_write_of_our_own_files_or_of_latest_is_agreed_on_too(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    engine = SavingEngine()
    real_save = torch.save

    def full(obj, path, *a, **kw):
        if Path(path).name == ck.rng_file(0):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(ck.CheckpointNotSaved) as err:
        save(engine, ckpt, 4)
    assert f"rank 0 could not write {ckpt / 'global_step4' / ck.rng_file(0)} ([Errno 28]" in str(err.value)
    assert "no earlier checkpoint of this run exists" in str(err.value)
    assert sorted(p.name for p in ckpt.iterdir()) == []
    monkeypatch.setattr(ck.torch, "save", real_save)

    save(engine, ckpt, 4)

    def no_latest(path, text):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))

    monkeypatch.setattr(ck, "write_atomic", no_latest)
    with pytest.raises(ck.CheckpointNotSaved, match=re.escape(f"could not write {ckpt / 'latest'} ([Errno 122] Disk "
                                                              "quota exceeded")):
        save(engine, ckpt, 8)
    assert (ckpt / "latest").read_text() == "global_step4" and not (ckpt / "global_step8").exists()
    monkeypatch.setattr(ck, "write_atomic", write_atomic)


def test_crash_request_variable(monkeypatch):
    monkeypatch.setenv(ck.CRASH_IN_SAVE_ENV, "global_step8")
    assert ck._crash_request("global_step8", 0) == ck._crash_request("global_step8", 1) == "all"
    assert ck._crash_request("global_step4", 0) is None
    monkeypatch.setenv(ck.CRASH_IN_SAVE_ENV, "global_step8:1")
    assert ck._crash_request("global_step8", 1) == "kill"
    assert ck._crash_request("global_step8", 0) is None and ck._crash_request("global_step4", 1) is None


def test_describe_disk_names_the_mount_point_and_the_free_space(tmp_path):
    text = ck.describe_disk(tmp_path / "not" / "yet")
    assert re.fullmatch(r"the file system mounted at /\S*: [0-9.]+ (B|KiB|MiB|GiB) free of [0-9.]+ (B|KiB|MiB|GiB)",
                        text), text


# -- a damaged checkpoint before a resume --------------------------------------------------------

def tag_with_files(ckpt: Path, tag: str) -> Path:
    d = ckpt / tag
    d.mkdir(parents=True)
    torch.save({"w": torch.arange(64.0)}, d / ck.model_states_file(0))
    torch.save({"m": torch.arange(64.0)}, d / ck.optim_states_file(0, 0))
    torch.save({"m": torch.arange(64.0)}, d / ck.optim_states_file(1, 0))
    return d


def flip_a_data_byte(path: Path) -> None:
    """Change one byte inside a tensor's data: the zip directory stays intact."""
    data = bytearray(path.read_bytes())
    i = data.index(torch.arange(64.0)[10].numpy().tobytes())
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_changed_byte_is_found_by_its_crc_and_named(tmp_path):
    ckpt = tmp_path / "checkpoints"
    tags = ["global_step2", "global_step4", "global_step6"]
    for t in tags:
        tag_with_files(ckpt, t)
    victim = ckpt / "global_step6" / ck.optim_states_file(1, 0)
    flip_a_data_byte(victim)
    assert ck.damaged(victim) is None  # a complete zip archive: the old check passes it
    torch.load(victim, weights_only=False)  # and torch loads it without a word
    with pytest.raises(ValueError) as err:
        rd.check_checkpoint_files(ckpt / "global_step6", tags, share=(0, 1))
    assert str(err.value) == (f"--resume: {victim} is damaged (its member {victim.stem}/data/0 fails its CRC-32 check: "
                              "bytes changed after it was written); resume from the newest undamaged earlier "
                              "checkpoint with --resume-tag global_step4")
    # the ranks share the CRC reads: files[rank::world]; the victim is the second of three files
    names = sorted(p.name for p in (ckpt / "global_step6").glob("*.pt"))
    index = names.index(victim.name)
    rd.check_checkpoint_files(ckpt / "global_step6", tags, share=((index + 1) % 2, 2))
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        rd.check_checkpoint_files(ckpt / "global_step6", tags, share=(index % 2, 2))


def test_the_suggested_fallback_skips_earlier_damaged_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    tags = ["global_step2", "global_step4", "global_step6"]
    for t in tags:
        tag_with_files(ckpt, t)
    latest_file = ckpt / "global_step6" / ck.model_states_file(0)
    latest_file.write_bytes(latest_file.read_bytes()[:100])  # truncated
    flip_a_data_byte(ckpt / "global_step4" / ck.optim_states_file(0, 0))
    with pytest.raises(ValueError) as err:
        rd.check_checkpoint_files(ckpt / "global_step6", tags, share=(0, 1))
    assert str(err.value).startswith(f"--resume: {latest_file} is damaged (not a complete torch file: ")
    assert str(err.value).endswith("truncated?); resume from the newest undamaged earlier checkpoint with "
                                   "--resume-tag global_step2")
    (ckpt / "global_step2" / ck.model_states_file(0)).write_bytes(b"")
    with pytest.raises(ValueError, match="no undamaged earlier checkpoint exists; start a new run"):
        rd.check_checkpoint_files(ckpt / "global_step6", tags, share=(0, 1))
    # asked for explicitly, an undamaged checkpoint passes
    (ckpt / "latest").write_text("global_step6")
    tag_with_files(ckpt, "global_step8")
    assert rd.check_run_dir(tmp_path, resume=True, overwrite=False, resume_tag="global_step8") == "global_step8"
