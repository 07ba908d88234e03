"""Bad input to a pre-training run: one clear line, exit code 2, before any process group or model."""

import json
from pathlib import Path

import pytest

from dist_sparse.train import run_dir as rd
from dist_sparse.train.main import main

ROOT = Path(__file__).resolve().parents[2]
CPU_CONFIG = ROOT / "ds_configs" / "cpu_zero2.json"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dist_sparse.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "d"
    prepare_data(out, default_corpus=True, max_documents=6, vocab_size=400, seq_len=32)
    return out


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
    assert "--resume: no checkpoint to resume from" in err


def test_output_that_holds_another_run(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text("{}")
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", run, "--max-steps", 2)
    assert "already holds a run" in err and "--overwrite" in err
    assert (run / "run.json").read_text() == "{}"  # nothing touched


def test_missing_data_and_missing_steps(data_dir, tmp_path, capsys):
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", tmp_path / "nope", "--output", tmp_path / "r",
                   "--max-steps", 2)
    assert "nope" in err
    err = run_main(capsys, "--deepspeed_config", CPU_CONFIG, "--data", data_dir, "--output", tmp_path / "r")
    assert "--max-steps" in err


def test_run_dir_rules(tmp_path):
    run = tmp_path / "r"
    assert rd.check_run_dir(run, resume=False, overwrite=False) is None  # new directory
    (run / "checkpoints" / "global_step4").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        rd.check_run_dir(run, resume=False, overwrite=False)
    assert rd.check_run_dir(run, resume=False, overwrite=True) is None
    with pytest.raises(ValueError, match="contradict"):
        rd.check_run_dir(run, resume=True, overwrite=True)
    # `latest` is what counts, and only when it names a checkpoint that exists.
    with pytest.raises(ValueError, match="no checkpoint"):
        rd.check_run_dir(run, resume=True, overwrite=False)
    rd.commit_latest(run / "checkpoints", "global_step4")
    assert rd.check_run_dir(run, resume=True, overwrite=False) == "global_step4"
    (run / "checkpoints" / "global_step8").mkdir()  # a save that never committed
    assert rd.check_run_dir(run, resume=True, overwrite=False) == "global_step4"
    rd.clear_run(run)
    assert not rd.holds_a_run(run)
    for step in (4, 8, 12):
        (run / "checkpoints" / f"global_step{step}").mkdir(parents=True, exist_ok=True)
    rd.prune_checkpoints(run / "checkpoints", keep=2, current="global_step12")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["global_step12", "global_step8"]


def test_metrics_truncated_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"split": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    rd.truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
