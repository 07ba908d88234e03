"""Bad input to a pre-training run: one clear line, exit code 2, before any process group or model."""

import json
from pathlib import Path

import pytest

from dist_sparse.train import run_dir as rd
from dist_sparse.train.checkpoint import checkpoint_layout, commit_latest, prune_checkpoints
from dist_sparse.train.main import main

ROOT = Path(__file__).resolve().parents[2]
CPU_CONFIG = ROOT / "ds_configs" / "cpu_zero2.json"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dist_sparse.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "d"
    prepare_data(out, default_corpus=True, max_documents=6, vocab_size=400, seq_len=32)
    return out


OUR_RUN_JSON = json.dumps({"argv": [], "deepspeed_config": {}, "data_meta": {}})  # the keys a start writes


def run_main(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error (rank 0): ") and err.count("\n") == 1
    return err


def config_with(tmp_path, **changes) -> Path:
    cfg = json.loads(CPU_CONFIG.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def test_unknown_key_in_training_section(data_dir, tmp_path, capsys):
    cfg = config_with(tmp_path, training={"save_intervall": 5})
    err = run_main(capsys, "--deepspeed_config", cfg, "--data", data_dir, "--output", tmp_path / "r", "--max-steps", 2)
    assert 'unknown key "training.save_intervall"' in err
    assert not (tmp_path / "r").exists()


def test_batch_sizes_that_do_not_multiply_out(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config_with(tmp_path, train_batch_size=10, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    err = run_main(capsys, "--deepspeed_config", cfg, "--data", data_dir, "--output", tmp_path / "r", "--max-steps", 2)
    assert "do not multiply out" in err and "data-parallel size 2" in err


def test_tp_degree_that_does_not_divide_the_world(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = config_with(tmp_path, tensor_parallel={"autotp_size": 2})
    err = run_main(capsys, "--deepspeed_config", cfg, "--data", data_dir, "--output", tmp_path / "r", "--max-steps", 2)
    assert "autotp_size 2 does not divide the world size 3" in err


def test_resume_without_checkpoint(data_dir, tmp_path, capsys):
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", tmp_path / "r",
                   "--max-steps", 2, "--resume")
    assert "has no checkpoint yet" in err and "without --resume" in err


def test_output_that_holds_another_run(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(OUR_RUN_JSON)
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", run, "--max-steps", 2)
    assert "already holds a run" in err and "--overwrite" in err
    assert (run / "run.json").read_text() == OUR_RUN_JSON  # nothing touched


def test_missing_data_and_missing_steps(data_dir, tmp_path, capsys):
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", tmp_path / "nope", "--output", tmp_path / "r",
                   "--max-steps", 2)
    assert "nope" in err
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", tmp_path / "r")
    assert "--max-steps" in err


def fake_tag(ckpt_dir: Path, tag: str, dp: int = 1, tp: int = 1) -> Path:
    """A checkpoint tag directory with DeepSpeed's file names, each a complete (tiny) torch file."""
    import torch

    d = ckpt_dir / tag
    d.mkdir(parents=True, exist_ok=True)
    for t in range(tp):
        torch.save({}, d / f"mp_rank_{t:02d}_model_states.pt")
        for r in range(dp):
            torch.save({}, d / f"zero_pp_rank_{r}_mp_rank_{t:02d}_optim_states.pt")
    return d


def test_run_dir_rules(tmp_path):
    run = tmp_path / "r"
    assert rd.check_run_dir(run, resume=False, overwrite=False) is None  # new directory
    fake_tag(run / "checkpoints", "global_step4")
    (run / "run.json").write_text(OUR_RUN_JSON)
    with pytest.raises(ValueError, match="already holds a run"):
        rd.check_run_dir(run, resume=False, overwrite=False)
    assert rd.check_run_dir(run, resume=False, overwrite=True) is None
    with pytest.raises(ValueError, match="contradict"):
        rd.check_run_dir(run, resume=True, overwrite=True)
    # `latest` is what counts, and only when it names a checkpoint that exists.
    with pytest.raises(ValueError, match="no 'latest' file"):
        rd.check_run_dir(run, resume=True, overwrite=False)
    commit_latest(run / "checkpoints", "global_step4")
    assert rd.check_run_dir(run, resume=True, overwrite=False) == "global_step4"
    fake_tag(run / "checkpoints", "global_step8")  # a save that never committed
    assert rd.check_run_dir(run, resume=True, overwrite=False) == "global_step4"
    assert rd.check_run_dir(run, resume=False, overwrite=False, resume_tag="global_step8") == "global_step8"
    rd.clear_run(run)
    assert not rd.holds_a_run(run)
    for step in (4, 8, 12):
        (run / "checkpoints" / f"global_step{step}").mkdir(parents=True, exist_ok=True)
    prune_checkpoints(run / "checkpoints", keep=2, current="global_step12")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["global_step12", "global_step8"]


def test_metrics_truncated_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"split": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    rd.truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


# -- issue 11: bad input that used to lose data, mislead or bury the message ---------------------

@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_and_data_may_not_overlap(data_dir, tmp_path, capsys, where):
    out = {"same": data_dir, "inside": data_dir / "run", "contains": data_dir.parent}[where]
    before = sorted(p.name for p in data_dir.iterdir())
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", out,
                   "--max-steps", 2, "--overwrite")
    assert {"same": "is --data", "inside": "lies inside --data", "contains": "contains --data"}[where] in err
    assert sorted(p.name for p in data_dir.iterdir()) == before  # nothing added or removed


def test_max_steps_zero_is_an_error_not_unset(data_dir, tmp_path, capsys):
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", tmp_path / "r",
                   "--max-steps", 0)
    assert "--max-steps must be at least 1 (got 0)" in err


def test_block_size_is_checked_with_the_config_before_anything_starts(data_dir, tmp_path, capsys, monkeypatch):
    """bert-tiny's weights are 128 x 128 and 512 x 128: a block of 48 divides none. Refused before
    any process group, without talking about tensor parallelism (there is none), leaving no
    run.json; with TP 2 the message names the shard."""
    cfg = config_with(tmp_path, sparsity={"method": "set", "sparsity": 0.8, "pattern": "block", "block_size": 48})
    run = tmp_path / "r"
    err = run_main(capsys, "--deepspeed_config", cfg, "--data", data_dir, "--output", run, "--max-steps", 4)
    assert "sparsity.block_size 48 does not divide" in err and "its shape (128, 128)" in err
    assert "tensor-parallel" not in err
    assert not run.exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config_with(tmp_path, tensor_parallel={"autotp_size": 2},
                      sparsity={"method": "set", "sparsity": 0.5, "pattern": "block", "block_size": 128})
    err = run_main(capsys, "--deepspeed_config", cfg, "--data", data_dir, "--output", run, "--max-steps", 4)
    assert "tensor-parallel shard of shape (128, 64)" in err  # attention.output.dense: columns split


def test_a_start_that_never_took_a_step_is_not_a_run(tmp_path):
    """What a start of ours left before its first step is replaced without --overwrite; a user's
    own folder with run-like names (a foreign run.json, event files of other tools) is not."""
    run = tmp_path / "r"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (run / "checkpoints").mkdir()
    (run / "run.json").write_text(json.dumps({"argv": [], "deepspeed_config": {}, "data_meta": {}}))
    (run / "notes.txt").write_text("mine")
    assert not rd.holds_a_run(run)
    assert rd.check_run_dir(run, resume=False, overwrite=False) is None
    rd.clear_failed_start(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    assert rd.holds_a_run(run)

    user = tmp_path / "u"
    (user / "tensorboard").mkdir(parents=True)
    (user / "tensorboard" / "events.out.tfevents.2").write_bytes(b"theirs")
    assert rd.holds_a_run(user)  # event files without our run.json: not ours to replace
    (user / "run.json").write_text('{"experiment": "theirs"}')
    assert rd.holds_a_run(user)
    with pytest.raises(ValueError, match="a run.json that dist_sparse did not write; refusing to replace it even"):
        rd.check_run_dir(user, resume=False, overwrite=False)


@pytest.mark.parametrize("theirs", ["run.json", "events"])
def test_overwrite_replaces_only_a_run_of_ours(data_dir, tmp_path, capsys, theirs):
    """--overwrite means what it means for export and prepare-data: replace what a run of ours
    wrote, never another tool's run.json or event files (issue 11, item 1)."""
    run = tmp_path / "r"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.other").write_bytes(b"theirs")
    if theirs == "run.json":
        (run / "run.json").write_text('{"experiment": "theirs", "lr": 3}')
        (run / "checkpoints" / "step-100").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", run, "--max-steps", 2,
                   "--overwrite")
    what = {"run.json": "a run.json that dist_sparse did not write",
            "events": "event files in tensorboard/ without a run.json"}[theirs]
    assert f"--output {run} holds {what}; refusing to replace it even with --overwrite" in err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    # a run of ours is replaced, the user's own files beside it stay
    (run / "run.json").write_text(OUR_RUN_JSON)
    assert rd.check_run_dir(run, resume=False, overwrite=True) is None
    rd.clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_damaged_checkpoint_file_is_named_and_the_previous_tag_suggested(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    fake_tag(run / "checkpoints", "global_step4")
    tag8 = fake_tag(run / "checkpoints", "global_step8")
    commit_latest(run / "checkpoints", "global_step8")
    victim = tag8 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:40])  # truncated mid-write
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", run,
                   "--max-steps", 8, "--resume")
    assert str(victim) in err and "is damaged" in err and "--resume-tag global_step4" in err
    # and the suggested flag gets past the check (it fails later, on this fake checkpoint's layout)
    assert rd.check_run_dir(run, resume=False, overwrite=False, resume_tag="global_step4") == "global_step4"
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", run,
                   "--max-steps", 8, "--resume-tag", "global_step6")
    assert "no checkpoint 'global_step6'" in err and "available: global_step4, global_step8" in err


def test_latest_naming_a_missing_tag_lists_the_checkpoints(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    fake_tag(run / "checkpoints", "global_step4")
    commit_latest(run / "checkpoints", "global_step12")
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", run,
                   "--max-steps", 8, "--resume")
    assert "names checkpoint 'global_step12', which is not in" in err
    assert "--resume-tag (available: global_step4)" in err and "without --resume" not in err


def test_resume_at_another_data_parallel_size_with_another_step_batch_is_one_line(data_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    # the config fixes the micro batch (8) and the accumulation (1): at DP 1 a step would hold 8
    # samples instead of the run's 16, so the data position and the schedules would not carry over
    run = tmp_path / "r"
    fake_tag(run / "checkpoints", "global_step4", dp=2)
    commit_latest(run / "checkpoints", "global_step4")
    (run / "run.json").write_text(json.dumps({"global_batch": 16, "max_steps": 8}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", run,
                   "--max-steps", 8, "--resume")
    assert "2 data-parallel x 1 tensor-parallel, ZeRO-1/2 -> 1 data-parallel x 1 tensor-parallel" in err
    assert "held 16 samples, this launch's would hold 8" in err and '"train_batch_size": 16' in err
    assert checkpoint_layout(run / "checkpoints" / "global_step4") == (2, 1)
    assert not (run / "universal").exists()  # refused before anything was converted


def test_resume_with_other_data_names_the_property(data_dir, tmp_path, capsys):
    from dist_sparse.data.prepare import prepare_data

    other = tmp_path / "other"
    prepare_data(other, default_corpus=True, max_documents=6, vocab_size=400, seq_len=48)
    capsys.readouterr()  # prepare_data's progress output
    run = tmp_path / "r"
    fake_tag(run / "checkpoints", "global_step4")
    commit_latest(run / "checkpoints", "global_step4")
    (run / "run.json").write_text(json.dumps({"data": str(data_dir), "data_meta": {"seq_len": 32, "vocab_size": 400}}))
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", other, "--output", run,
                   "--max-steps", 8, "--resume")
    assert "has sequence length 48, the run started with 32" in err and str(data_dir) in err
    # data of the same shape from another corpus: named by its example count, before any process group
    same_shape = tmp_path / "same_shape"
    prepare_data(same_shape, default_corpus=True, max_documents=9, vocab_size=400, seq_len=32)
    capsys.readouterr()
    recorded = json.loads((data_dir / "meta.json").read_text())
    (run / "run.json").write_text(json.dumps({"data": str(data_dir), "data_meta": recorded}))
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", same_shape, "--output", run,
                   "--max-steps", 8, "--resume")
    now = json.loads((same_shape / "meta.json").read_text())
    assert f"--data {same_shape} has training examples {now['num_train']}, the run started with " \
           f"{recorded['num_train']} ({data_dir}); resume with that data" in err


def test_changed_sparsity_section_names_the_keys():
    from dist_sparse.sparsifier import section_changes

    assert section_changes({"method": "set", "sparsity": 0.8, "seed": 1},
                           {"method": "static", "sparsity": 0.8, "seed": 2}) == \
        "method: 'set' -> 'static', seed: 1 -> 2"


def test_shm_buffers_of_this_job_are_removed(monkeypatch):
    import os

    from dist_sparse.distributed.comm import remove_shm_buffers

    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm on this machine")
    port = 60000 + os.getpid() % 5000
    ours = [shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1)]
    other = shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port + 1}_0"
    for f in ours + [other]:
        f.write_bytes(b"x")
    try:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        assert sorted(remove_shm_buffers()) == sorted(f.name for f in ours)
        assert not any(f.exists() for f in ours) and other.exists()  # another job's stay
    finally:
        for f in ours + [other]:
            f.unlink(missing_ok=True)


def test_the_entry_point_removes_the_buffers_on_an_error(data_dir, tmp_path, capsys, monkeypatch):
    import os

    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm on this machine")
    port = 55000 + os.getpid() % 5000
    buf = shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    buf.write_bytes(b"x")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", tmp_path / "r",
                 "--max-steps", 0)
        assert not buf.exists()
    finally:
        buf.unlink(missing_ok=True)


@pytest.mark.parametrize("kind", ["meta.json", "config.json"])
def test_output_may_not_be_another_dataset_or_an_export(data_dir, tmp_path, capsys, kind):
    """A run written into a prepared dataset or an export would be deleted by that folder's next
    --overwrite; refused before anything is written, even with --overwrite."""
    out = tmp_path / "other"
    out.mkdir()
    (out / kind).write_text("{}")
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", out, "--max-steps", 2,
                   "--overwrite")
    assert "not a run directory: give the run a directory of its own" in err
    assert sorted(p.name for p in out.iterdir()) == [kind]
